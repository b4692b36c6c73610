"""Cold start and single-request latency of a function, measured over real HTTP.

Starts ``functions-framework`` (gunicorn, as ``make serve`` does) and measures:

* cold start: process start -> first successful prediction (model load and warm-up included);
* single-request latency: N sequential requests, one client; p50 / p90 / p99 as the client sees
  them. Sentiment: a short (~12 words) and a long (~60 words) text and an 8-text batch. Classify
  (zero-shot): one ticket against 5 labels with the label cache warm (the same labels every time)
  and cold (a new template each request, so all 5 label prompts are embedded again), and a batch.

Usage: ``python bench/latency.py [--function sentiment|classify] [--requests 200] [--json F]``.
The machine is shared and noisy: compare figures from one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from benchlib import free_port, start_function

TICKET = "I was charged twice for my subscription this month, please refund one payment."
LABELS = ["billing", "bug report", "feature request", "account access", "shipping"]
SENTIMENT = {
    "short text": {"text": "The support team answered quickly and solved my problem."},
    "long text": {
        "text": (
            "I ordered the blender three weeks ago. Delivery was late, the box was damaged and "
            "one blade was missing, but customer service sent a replacement within two days and "
            "the new one works well; it crushes ice easily and is quieter than my old one, "
            "although the lid is hard to clean."
        )
    },
    "batch of 8": {
        "texts": [f"Review {i}: the product was fine, nothing special." for i in range(8)]
    },
}
CLASSIFY = {
    "1 text, 5 labels, label cache warm": {"text": TICKET, "labels": LABELS},
    # {n} is replaced by the request's number: every request brings 5 label prompts never seen.
    "1 text, 5 labels, label cache cold": {
        "text": TICKET,
        "labels": LABELS,
        "template": "Request {n} is about {label}.",
    },
    "batch of 8, 5 labels, cache warm": {
        "texts": [f"{TICKET} Order {i}." for i in range(8)],  # distinct: repeats are deduplicated
        "labels": LABELS,
    },
}
PAYLOADS = {"sentiment": SENTIMENT, "classify": CLASSIFY}
ENDPOINTS = {"sentiment": "/v1/analyze/sentiment", "classify": "/v1/classify"}
_counter = iter(range(1 << 62))


def _fresh(payload: dict[str, object]) -> dict[str, object]:
    template = payload.get("template")
    if isinstance(template, str):
        return {**payload, "template": template.replace("{n}", str(next(_counter)))}
    return payload


def _post(url: str, payload: dict[str, object]) -> float:
    data = json.dumps(_fresh(payload)).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
    return time.perf_counter() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--function", default="sentiment", choices=sorted(ENDPOINTS))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}{ENDPOINTS[args.function]}"
    # The prediction cache would answer every repeat: measure the model (bench/cache.py measures
    # the cache). MODEL_DIR, if set, overrides the prepared model.
    env = {"CACHE_MAX_ENTRIES": "0"}
    if os.environ.get("MODEL_DIR"):
        env["MODEL_DIR"] = os.environ["MODEL_DIR"]
    started = time.perf_counter()
    proc = start_function(args.function, port, env)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            try:
                _post(url, next(iter(PAYLOADS[args.function].values())))
                break
            except OSError:
                time.sleep(0.02)
        cold = time.perf_counter() - started

        results: dict[str, dict[str, float]] = {}
        for name, payload in PAYLOADS[args.function].items():
            for _ in range(5):
                _post(url, payload)
            samples = [_post(url, payload) for _ in range(args.requests)]
            results[name] = {
                "p50_ms": 1000 * statistics.median(samples),
                "p90_ms": 1000 * _percentile(samples, 0.90),
                "p99_ms": 1000 * _percentile(samples, 0.99),
            }
    finally:
        proc.terminate()
        proc.wait(timeout=15)

    cpus = len(os.sched_getaffinity(0))
    machine = f"{platform.machine()}, {cpus} CPUs, Python {platform.python_version()}"
    print(f"{args.function} on {machine}")
    print(f"cold start (process start -> first prediction): {cold:.2f} s")
    print("| request | p50 | p90 | p99 |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['p50_ms']:.1f} ms | {r['p90_ms']:.1f} ms | {r['p99_ms']:.1f} ms |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": machine, "cold_start_s": cold, "latency": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
