"""The same text gets the same answer: alone, in any batch, among any concurrent requests, with
the cache on or off, on either model worker.

Real servers (functions-framework, two model workers, the served int8 graphs) get shuffled mixes
of texts of very different lengths, from many connections at once, and every score must equal
the score the same text got alone, to the last digit the API shows (6 decimals) and, through
the models themselves, to 1e-6.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aifn.core.model import TextClassifier, TextEncoder

from .helpers import CLASSIFY_MODEL, Server, start_server

pytestmark = pytest.mark.integration

WORDS = [
    "the",
    "delivery",
    "was",
    "late",
    "again",
    "and",
    "nobody",
    "answered",
    "my",
    "emails",
    "but",
    "the",
    "product",
    "itself",
    "is",
    "great",
    "value",
    "for",
    "the",
    "price",
    "although",
    "the",
    "battery",
    "drains",
    "fast",
    "and",
    "the",
    "screen",
    "scratches",
    "easily",
]


def _texts(n: int, seed: int) -> list[str]:
    """Texts from one word to a few hundred (past the token limit), all distinct."""
    rng = random.Random(seed)
    lengths = [1, 2, 3, 5, 8, 13, 21, 40, 80, 150, 300]
    return [
        f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.choice(lengths))) for i in range(n)
    ]


TEXTS = _texts(48, seed=5)
LABELS = ["billing", "shipping", "product quality", "support"]


def _scores(result: dict[str, Any]) -> dict[str, float]:
    return {item["label"]: item["score"] for item in result["labels"]}


def _mixes(texts: list[str], rounds: int, seed: int) -> list[list[str]]:
    """Shuffled requests of 1-16 texts covering ``texts`` ``rounds`` times."""
    rng = random.Random(seed)
    requests: list[list[str]] = []
    for _ in range(rounds):
        order = texts[:]
        rng.shuffle(order)
        while order:
            size = rng.randint(1, 16)
            requests.append(order[:size])
            order = order[size:]
    rng.shuffle(requests)
    return requests


@pytest.fixture(scope="module")
def servers(
    sentiment_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[tuple[str, str], Server]]:
    """Both functions, each with the prediction cache off and on: four servers."""
    started: dict[tuple[str, str], Server] = {}
    try:
        for cache in ("off", "on"):
            env = {"MODEL_WORKERS": "2", "INTRA_OP_THREADS": "1", "BATCH_WAIT_MS": "2"}
            if cache == "off":
                env["CACHE_MAX_ENTRIES"] = "0"
            started["sentiment", cache] = start_server(
                sentiment_model_dir, tmp_path_factory.mktemp(f"sentiment-cache-{cache}"), **env
            )
            started["classify", cache] = start_server(
                CLASSIFY_MODEL,
                tmp_path_factory.mktemp(f"classify-cache-{cache}"),
                function="classify",
                **env,
            )
        yield started
    finally:
        for server in started.values():
            server.proc.terminate()
            server.proc.wait(timeout=15)


def _post(server: Server, path: str, body: dict[str, Any]) -> list[dict[str, float]]:
    status, reply, _ = server.request("POST", path, body)
    assert status == 200, reply
    return [_scores(r) for r in reply["results"]]


def _check(servers: dict[tuple[str, str], Server], function: str, extra: dict[str, Any]) -> None:
    path = "/v1/analyze/sentiment" if function == "sentiment" else "/v1/classify"
    fresh, cached = servers[function, "off"], servers[function, "on"]
    # Each text alone, on a server that never caches.
    alone = {t: _post(fresh, path, {"text": t, **extra})[0] for t in TEXTS}
    requests = _mixes(TEXTS, rounds=3, seed=11)

    def send(args: tuple[Server, list[str]]) -> list[tuple[str, dict[str, float]]]:
        server, batch = args
        return list(zip(batch, _post(server, path, {"texts": batch, **extra}), strict=True))

    # The same shuffled mixes, 12 at a time, to both servers at once: the cached one computes
    # each text first inside some mix, then answers the later rounds from its cache.
    jobs = [(server, batch) for batch in requests for server in (fresh, cached)]
    with ThreadPoolExecutor(12) as pool:
        mixed = [pair for pairs in pool.map(send, jobs) for pair in pairs]
    assert len(mixed) == 2 * 3 * len(TEXTS)
    moved = [(t, s, alone[t]) for t, s in mixed if s != alone[t]]
    assert not moved, f"{len(moved)} of {len(mixed)} results moved, e.g. {moved[0]}"
    for server in (fresh, cached):
        assert server.request("GET", "/v1/health")[1]["batching"]["largest"] > 1  # merged


def test_sentiment_scores_do_not_depend_on_batch_mates_or_the_cache(
    servers: dict[tuple[str, str], Server],
) -> None:
    _check(servers, "sentiment", {})


def test_zero_shot_scores_do_not_depend_on_batch_mates_or_the_cache(
    servers: dict[tuple[str, str], Server],
) -> None:
    _check(servers, "classify", {"labels": LABELS})


def test_the_models_give_each_text_the_same_vector_in_any_company(
    sentiment_model_dir: Path,
) -> None:
    """Below the API's rounding: the raw outputs, alone and in shuffled lists, within 1e-6."""
    classifier = TextClassifier.load(sentiment_model_dir, max_tokens=256, threads=1)
    encoder = TextEncoder.load(CLASSIFY_MODEL, max_tokens=256, threads=1)
    texts = TEXTS[:24]
    for model in (classifier, encoder):
        alone = {t: model.forward([t])[0][0] for t in texts}
        for batch in _mixes(texts, rounds=2, seed=3):
            rows, _ = model.forward(batch)
            for text, row in zip(batch, rows, strict=True):
                assert np.abs(row - alone[text]).max() <= 1e-6, (type(model).__name__, text)
