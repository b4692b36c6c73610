"""How long one request can hold a classify instance, with the work limits and without them.

Starts two real classify servers side by side (functions-framework, default settings, no
prediction cache so every request runs the model): one with the shipped limits, one with
``MAX_REQUEST_TOKENS`` and ``MAX_TEXT_CHARS`` lifted, and times the same requests on each, one
at a time, median of ``--repeat`` runs (new labels are new on every run). Prints JSON.

Requests: a one-word text; the issue's example (64 texts of 300 words, 50 new labels with
1,000-character descriptions); the worst the defaults allow with cached labels (64 texts of 256
tokens: the whole 16,384-token budget) and with new labels (described labels filling the budget
beside full texts); 64 texts of 5,000 CJK characters (each character a token; the body is just
under 1 MiB), which the cut bounds.

Usage: ``python bench/work_limits.py [--repeat N]``. The machine's other load moves absolute
times; compare the two servers' figures from the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from benchlib import free_port, start_function, wait_for_port

WORDS = [
    "the",
    "market",
    "shares",
    "rose",
    "after",
    "company",
    "reported",
    "strong",
    "quarterly",
    "earnings",
    "while",
    "analysts",
    "expected",
    "weaker",
    "growth",
    "in",
    "europe",
    "and",
    "asia",
    "as",
    "the",
    "central",
    "bank",
    "held",
    "rates",
]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def described_labels(rng: random.Random, n: int) -> tuple[list[str], dict[str, str]]:
    labels = [f"topic {rng.random():.12f}" for _ in range(n)]
    return labels, {label: words(rng, 250)[:1000] for label in labels}


REQUESTS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "one word": lambda rng: {"text": "hello", "labels": ["sport", "politics"]},
    "issue example: 64 x 300 words + 50 new described labels": lambda rng: dict(
        zip(
            ("labels", "descriptions"),
            described_labels(rng, 50),
            strict=True,
        ),
        texts=[words(rng, 300) for _ in range(64)],
    ),
    "worst allowed, cached labels: 64 x 256 tokens": lambda rng: {
        "texts": [words(rng, 400) for _ in range(64)],
        "labels": ["sport", "politics"],
    },
    "worst allowed, new labels: 25 x 256 tokens + 50 new described labels": lambda rng: dict(
        zip(
            ("labels", "descriptions"),
            described_labels(rng, 50),
            strict=True,
        ),
        texts=[words(rng, 400) for _ in range(25)],
    ),
    "64 x 5,000 CJK characters": lambda rng: {
        "texts": [
            "".join(chr(0x4E00 + rng.randrange(2000)) for _ in range(5000)) for _ in range(64)
        ],
        "labels": ["sport", "politics"],
    },
}


def post(url: str, body: dict[str, Any]) -> tuple[int, float, str]:
    data = json.dumps(body, ensure_ascii=False).encode()
    req = urllib.request.Request(
        url + "/v1/classify", data=data, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            status, kind = resp.status, "ok"
    except urllib.error.HTTPError as err:
        status, kind = err.code, json.loads(err.read())["error"]["type"]
    return status, time.perf_counter() - started, kind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    servers = {
        "defaults": {"CACHE_MAX_ENTRIES": "0"},
        "limits lifted": {
            "CACHE_MAX_ENTRIES": "0",
            "MAX_REQUEST_TOKENS": "10000000",
            "MAX_TEXT_CHARS": "10000000",
        },
    }
    procs = {}
    urls = {}
    for name, env in servers.items():
        port = free_port()
        procs[name] = start_function("classify", port, env)
        urls[name] = f"http://127.0.0.1:{port}"
    try:
        for name, proc in procs.items():
            wait_for_port(int(urls[name].rsplit(":", 1)[1]), proc)
        figures: dict[str, Any] = {}
        rng = random.Random(18)
        for label, make in REQUESTS.items():
            row: dict[str, Any] = {}
            for _ in range(args.repeat):
                body = make(rng)
                for name, url in urls.items():
                    status, seconds, kind = post(url, body)
                    cell = row.setdefault(name, {"status": status, "type": kind, "seconds": []})
                    cell["seconds"].append(seconds)
            for cell in row.values():
                cell["median_s"] = round(statistics.median(cell.pop("seconds")), 3)
            figures[label] = row
        print(json.dumps(figures, indent=2))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
