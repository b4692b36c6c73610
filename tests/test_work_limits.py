"""Work limits (issue 18): the character cap, the token budget, work units, label-cache shares.

On the real functions and models, in process (functions-framework's ``create_app``), with small
limits so a test request can reach them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aifn.core.cache import caller_scope
from aifn.core.errors import TooManyTokens
from aifn.core.model import TextEncoder

from .helpers import CLASSIFY_MODEL, REPO, SENTIMENT_MODEL, function_app

sys.path.insert(0, str(REPO / "functions" / "classify"))
import zero_shot

pytestmark = pytest.mark.integration

SENTIMENT = "/v1/analyze/sentiment"
CLASSIFY = "/v1/classify"


def _app(function: str, model: Path, **env: str) -> tuple[Any, Any]:
    return function_app(function, model, **{"CACHE_MAX_ENTRIES": "0", **env})


@pytest.fixture(scope="module")
def sentiment() -> Any:
    return _app("sentiment", SENTIMENT_MODEL, MAX_TEXT_CHARS="300", MAX_REQUEST_TOKENS="600")[0]


@pytest.fixture(scope="module")
def classify() -> tuple[Any, Any]:
    return _app("classify", CLASSIFY_MODEL, MAX_REQUEST_TOKENS="600")


def test_a_text_over_max_text_chars_is_cut_and_says_truncated(sentiment: Any) -> None:
    # Few tokens, many characters: the tokenizer would have read "great" at the end and not
    # truncated; the cut keeps it from tokenizing 100,000 characters.
    padded = "This is awful." + " " * 100_000 + "great great great"
    short = "This is awful."
    got = sentiment.post(SENTIMENT, json={"texts": [padded, short]}).get_json()["results"]
    assert got[0]["truncated"] is True
    assert got[1]["truncated"] is False
    assert got[0]["labels"] == got[1]["labels"]  # the model read what the cut kept


def test_a_request_over_the_token_budget_is_refused_naming_the_limit(sentiment: Any) -> None:
    # 60 words: 62 tokens with [CLS] and [SEP]; ten of them are 620 tokens.
    response = sentiment.post(SENTIMENT, json={"texts": ["word " * 60] * 10})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["type"] == "too_many_tokens"
    assert "MAX_REQUEST_TOKENS" in error["message"]
    assert "600" in error["message"]
    # Within it: the same texts, fewer of them.
    assert sentiment.post(SENTIMENT, json={"texts": ["word " * 60] * 9}).status_code == 200


@pytest.mark.parametrize("model", [SENTIMENT_MODEL, CLASSIFY_MODEL], ids=["sentiment", "classify"])
def test_no_text_counts_more_than_max_tokens(model: Path) -> None:
    """What lets the budget skip tokenizing a request that cannot reach it: whatever the text
    (long, accented, CJK, Hangul, emoji, symbols), its count stops at the truncation."""
    from aifn.core.limits import WorkLimits

    limits = WorkLimits(
        model / "tokenizer.json", max_text_chars=10_000, max_tokens=32, max_request_tokens=64
    )
    texts = [
        "word " * 500,
        "é" * 3000,
        "한국어 텍스트 " * 300,
        "漢字" * 2000,
        "\U0001f600 " * 1000,
        "$%^&*" * 500,
        "a",
        "",
    ]
    counts = limits.tokens(texts)
    assert max(counts) == 32
    assert min(counts) == 2  # [CLS] [SEP]
    limits.check(texts[:2])  # 2 x 32 <= 64: not counted, and could not be over
    with pytest.raises(TooManyTokens):
        limits.check(texts[:3])  # 3 x 32 > 64: counted, and is over


def test_the_budget_counts_new_label_prompts_not_cached_ones(classify: tuple[Any, Any]) -> None:
    client, main = classify
    cache = main.zero_shot.label_cache
    labels = [f"budget label {i}" for i in range(8)]
    descriptions = {label: f"{label}: " + "words about this topic " * 12 for label in labels}
    body = {"texts": ["word " * 60] * 5, "labels": labels, "descriptions": descriptions}
    misses = cache.misses
    refused = client.post(CLASSIFY, json=body)
    assert refused.status_code == 422, refused.get_json()
    assert "new label prompt" in refused.get_json()["error"]["message"]
    assert cache.misses == misses  # refused before any model work
    # The same labels with one short text fit, and are cached; then the big request fits too.
    assert client.post(CLASSIFY, json={**body, "texts": ["hi"]}).status_code == 200
    assert client.post(CLASSIFY, json=body).status_code == 200


def test_work_units_are_texts_plus_new_label_prompts(classify: tuple[Any, Any]) -> None:
    client, main = classify
    service = main.service
    body = {"texts": ["a", "b", "c"], "labels": ["units one", "units two"]}
    assert service.work_units(CLASSIFY, body) == 5
    assert client.post(CLASSIFY, json=body).status_code == 200
    assert service.work_units(CLASSIFY, body) == 3  # the labels are cached now
    assert service.work_units(CLASSIFY, {"text": "a", "labels": ["units one", "x y"]}) == 2
    for malformed in (None, [], {"texts": 5}, {"text": "a"}, "x" * 10):
        assert service.work_units(CLASSIFY, malformed) == 1
    assert service.work_units("/nowhere", body) == 1


def test_a_list_the_api_refuses_costs_one_unit_not_its_length() -> None:
    """1,000 texts are refused (422 too_many_texts) before any model work; charging 1,000
    units of rate limit for them would lock the caller out for work never done."""
    client, main = _app("sentiment", SENTIMENT_MODEL, MAX_BATCH_TEXTS="8")
    service = main.service
    assert service.work_units(SENTIMENT, {"texts": ["fine"] * 8}) == 8
    assert service.work_units(SENTIMENT, {"texts": ["fine"] * 1000}) == 1
    refused = client.post(SENTIMENT, json={"texts": ["fine"] * 1000})
    assert refused.status_code == 422
    assert refused.get_json()["error"]["type"] == "too_many_texts"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("café", "cafe\u0301"),
        ("billing", "\uff42\uff49\uff4c\uff4c\uff49\uff4e\uff47"),
        ("file", "\ufb01le"),
        ("billing", "bill\u00ading"),
    ],
    ids=["nfc", "full-width", "ligature", "soft-hyphen"],
)
def test_labels_that_normalise_alike_are_a_duplicate(
    classify: tuple[Any, Any], a: str, b: str
) -> None:
    response = classify[0].post(CLASSIFY, json={"text": "x", "labels": [a, "other", b]})
    assert response.status_code == 422
    error = response.get_json()["error"]
    assert error["type"] == "invalid_request"
    assert "repeats 'labels[0]'" in error["message"]


# --- the label cache's shares, on the real encoder -------------------------------------------


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder.load(CLASSIFY_MODEL, max_tokens=64)


def test_one_callers_random_labels_cannot_flush_the_shared_label_cache(
    encoder: TextEncoder,
) -> None:
    cache = zero_shot.LabelCache(encoder.rows, capacity=64, share=8)
    common = [f"This is about {t}." for t in ("sport", "politics", "business", "technology")]
    cache.embeddings(common, owner="alice")
    cache.embeddings(common, owner="bob")  # a second caller: now everyone's
    bobs_own = [f"bob's label {i}" for i in range(4)]
    cache.embeddings(bobs_own, owner="bob")
    # Mallory sends 50 requests of 10 random labels: 500 new prompts into a 64-entry cache.
    for request in range(50):
        cache.embeddings([f"random {request}.{i}" for i in range(10)], owner="mallory")
        assert cache.owned("mallory") <= 8
    misses = cache.misses
    cache.embeddings(common, owner="carol")
    cache.embeddings(bobs_own, owner="bob")
    assert cache.misses == misses  # neither the shared labels nor bob's own were evicted
    assert len(cache) <= 64


def test_a_caller_over_its_share_loses_its_own_oldest_label(encoder: TextEncoder) -> None:
    cache = zero_shot.LabelCache(encoder.rows, capacity=100, share=3)
    for label in ("a one", "a two", "a three", "a four"):
        cache.embeddings([label], owner="ann")
    assert cache.owned("ann") == 3
    assert cache.missing(["a one", "a two", "a four"]) == ["a one"]


def test_the_shared_cache_keeps_the_encoders_vectors(encoder: TextEncoder) -> None:
    cache = zero_shot.LabelCache(encoder.rows, capacity=8, share=2)
    first = cache.embeddings(["sport"], owner="x")
    again = cache.embeddings(["sport"], owner="y")
    direct, _ = encoder.embed(["sport"])
    assert np.array_equal(first[0], direct[0])
    assert np.array_equal(again[0], direct[0])


def test_classify_caches_new_labels_as_the_callers_own(classify: tuple[Any, Any]) -> None:
    _client, main = classify
    cache = main.zero_shot.label_cache
    with caller_scope("addr:192.0.2.7"):
        main.predict(["a text"], main.parse_options({"labels": ["owner one", "owner two"]}))
    assert cache.owned("addr:192.0.2.7") == 2


def test_over_http_one_callers_random_labels_leave_others_labels_cached() -> None:
    """End to end: callers told apart by their address (the default identity), a small cache."""
    client, main = _app(
        "classify",
        CLASSIFY_MODEL,
        LABEL_CACHE_SIZE="64",
        LABEL_CACHE_CALLER_SHARE="8",
        MAX_LABELS="8",
    )
    cache = main.zero_shot.label_cache

    def send(address: str, labels: list[str]) -> None:
        response = client.post(
            CLASSIFY,
            json={"text": "The match ended in a draw.", "labels": labels},
            headers={"X-Forwarded-For": address},
        )
        assert response.status_code == 200, response.get_json()

    everyones = ["sport", "politics", "business", "technology"]
    send("198.51.100.1", everyones)
    send("198.51.100.2", everyones)  # used by two callers: shared
    for request in range(100):  # 800 random labels from one address
        send("203.0.113.9", [f"random {request}.{i}" for i in range(8)])
    misses = cache.misses
    send("198.51.100.3", everyones)
    assert cache.misses == misses, "one caller's random labels evicted everyone's labels"
