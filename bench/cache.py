"""Prediction cache: hit vs miss, in-process vs Redis vs no cache, side by side in one run.

For each configuration the sentiment function is started as ``make serve`` starts it (gunicorn via
functions-framework, 1 worker, 8 threads) and measured over HTTP on loopback:

* miss: sequential requests with a text never seen before (the model runs, the cache is written);
* hit: sequential requests with a text already cached;
* server time: what the function itself spent (its ``Server-Timing`` header), which is what a
  cache hit saves compute on; client time adds HTTP and the client;
* hit throughput: 8 concurrent clients sending cached texts for a few seconds.

A real ``redis-server`` is started on a free port for the Redis configuration.

Usage: ``python bench/cache.py [--requests 300] [--seconds 5] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import free_port, start_function, wait_for_port

ENDPOINT = "/v1/analyze/sentiment"


class Client:
    """One keep-alive HTTP connection; returns (client ms, server ms, cached)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, text: str) -> tuple[float, float, bool]:
        body = json.dumps({"text": text})
        started = time.perf_counter()
        self.conn.request("POST", ENDPOINT, body, {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        payload = json.loads(resp.read())
        client_ms = 1000 * (time.perf_counter() - started)
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {payload}")
        server_ms = float(resp.headers["Server-Timing"].split("dur=")[1])
        return client_ms, server_ms, bool(payload["results"][0]["cached"])


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(name: str, env: dict[str, str], requests: int, seconds: float) -> dict[str, Any]:
    port = free_port()
    proc = start_function("sentiment", port, env)
    try:
        wait_for_port(port, proc)
        client = Client(port)
        for i in range(10):
            client.post(f"warm-up text number {i} for {name}")
        texts = [
            f"Delivery {i} for {name} was late but the product works well." for i in range(requests)
        ]
        misses = [client.post(t) for t in texts]
        hits = [client.post(t) for t in texts]
        result: dict[str, Any] = {}
        for label, samples in (("miss", misses), ("hit", hits)):
            result[label] = {
                "cached": sum(s[2] for s in samples) / len(samples),
                "client_p50_ms": statistics.median(s[0] for s in samples),
                "client_p99_ms": _p([s[0] for s in samples], 0.99),
                "server_p50_ms": statistics.median(s[1] for s in samples),
                "server_p99_ms": _p([s[1] for s in samples], 0.99),
            }
        result["hit_rps"] = _throughput(port, texts, seconds)
        return result
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _throughput(port: int, texts: list[str], seconds: float, clients: int = 8) -> float:
    done = [0] * clients
    stop_at = time.monotonic() + seconds

    def run(n: int) -> None:
        client = Client(port)
        i = n
        while time.monotonic() < stop_at:
            client.post(texts[i % len(texts)])
            done[n] += 1
            i += clients

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    redis_exe = shutil.which("redis-server")
    if redis_exe is None:
        raise SystemExit("redis-server is not installed (make services installs it)")
    redis_port = free_port()
    workdir = tempfile.mkdtemp()
    redis = subprocess.Popen(
        [
            *(redis_exe, "--port", str(redis_port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for_port(redis_port, redis)
        configs = {
            "no cache": {"CACHE_MAX_ENTRIES": "0"},
            "in-process": {},
            "Redis (loopback)": {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"},
        }
        results = {
            name: measure(name, env, args.requests, args.seconds) for name, env in configs.items()
        }
    finally:
        redis.terminate()
        redis.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    cpus = len(os.sched_getaffinity(0))
    machine = f"{platform.machine()}, {cpus} CPUs, Python {platform.python_version()}"
    print(f"sentiment, one short text per request, on {machine}")
    print("| cache | request | from cache | server p50 | server p99 | client p50 | client p99 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for kind in ("miss", "hit"):
            m = r[kind]
            print(
                f"| {name} | {'repeat' if kind == 'hit' else 'new text'} | {m['cached']:.0%} "
                f"| {m['server_p50_ms']:.2f} ms | {m['server_p99_ms']:.2f} ms "
                f"| {m['client_p50_ms']:.2f} ms | {m['client_p99_ms']:.2f} ms |"
            )
    print("\n| cache | repeated texts, 8 clients |\n|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['hit_rps']:.0f} req/s |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
