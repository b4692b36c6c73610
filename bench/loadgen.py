"""A closed-loop HTTP load generator: N keep-alive connections, each sending its next request as
soon as the previous response arrives. Run as its own process (``bench/load.py`` does).

Why not wrk: the figures that matter under overload are the latency of the *accepted* (200)
requests and the count of each status, and wrk's Lua hooks cannot pair a response with its
latency. This client records both per request, in a few microseconds of CPU each (raw HTTP/1.1
over asyncio streams, no HTTP library), and reports its own CPU time so the cost is visible.

Every request carries a text no other request has (a sample review plus a serial number), so no
cache or single-flight deduplication can answer it; ``--repeat 0.5`` instead sends half of the
requests with the sample texts alone, which recur (for the cache's tests).

Usage: ``python bench/loadgen.py URL --connections 32 --duration 15 [--warmup 3]``; prints
one JSON object. ``--events PATH`` also writes every request as a JSON line: when it was sent
and answered (``time.perf_counter()``, on Linux the system-wide monotonic clock, so comparable
with another process's) and its status or error, for tests that time faults against requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlsplit

SAMPLES = [
    "The support team answered quickly and solved my problem.",
    "Terrible, it broke after a day.",
    "I love this, it works perfectly!",
    "Delivery was late and the box was damaged, but the replacement arrived in two days.",
    "Not bad for the price.",
    "The app keeps crashing whenever I try to upload a photo, which is really frustrating.",
    "Absolutely fantastic experience from start to finish, I will recommend it to everyone.",
    "It does what it says.",
    "The screen is bright and sharp, although the battery drains faster than I expected "
    "and the charger gets warm.",
    "Worst purchase I have made this year.",
    "Customer service was polite but could not fix the billing error on my account.",
    "Meh.",
    "The hotel room was clean and quiet, the breakfast was average and the staff were "
    "friendly, but the wifi kept dropping every evening.",
    "Great value, fast shipping, exactly as described.",
    "I waited forty minutes on hold and then the call was dropped.",
    "This update finally fixed the sync problem; everything feels faster now.",
]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Stats:
    def __init__(self) -> None:
        self.latency: dict[int, list[float]] = {}
        self.errors: dict[str, int] = {}
        # (sent, answered, status or error kind) of every request, warm-up included.
        self.events: list[tuple[float, float, int | str]] = []

    def add(self, status: int, seconds: float) -> None:
        self.latency.setdefault(status, []).append(seconds)

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split(b" ", 2)[1])
    length = 0
    close = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


async def _connection(
    host: str,
    port: int,
    path: str,
    serial: int,
    stride: int,
    record_from: float,
    stop: float,
    stats: Stats,
    timeout: float,
    texts_per_request: int,
    repeat: float = 0.0,
) -> None:
    reader = writer = None
    n = serial
    while time.perf_counter() < stop:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError:
                stats.error("connect")
                now = time.perf_counter()
                stats.events.append((now, now, "connect"))
                await asyncio.sleep(0.05)
                continue
        assert reader is not None
        # A recurring request sends the sample texts alone (a fixed share, spread evenly).
        recurring = n * 37 % 100 < repeat * 100
        if texts_per_request == 1:
            tag = "" if recurring else f" (#{n})"
            body = json.dumps({"text": f"{SAMPLES[n % len(SAMPLES)]}{tag}"}).encode()
        else:
            texts = [
                SAMPLES[(n + k) % len(SAMPLES)] + ("" if recurring else f" (#{n}.{k})")
                for k in range(texts_per_request)
            ]
            body = json.dumps({"texts": texts}).encode()
        n += stride
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        sent = time.perf_counter()
        try:
            writer.write(request)
            status, close = await asyncio.wait_for(_read_response(reader), timeout)
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            stats.error("connection")
            stats.events.append((sent, time.perf_counter(), "connection"))
            writer.close()
            writer = None
            continue
        except TimeoutError:
            stats.error("timeout")
            stats.events.append((sent, time.perf_counter(), "timeout"))
            writer.close()
            writer = None
            continue
        done = time.perf_counter()
        stats.events.append((sent, done, status))
        if sent >= record_from and done <= stop:
            stats.add(status, done - sent)
        if close:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def run(
    url: str,
    connections: int,
    duration: float,
    warmup: float,
    timeout: float,
    texts_per_request: int = 1,
    repeat: float = 0.0,
    events: str | None = None,
) -> dict:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    stats = Stats()
    start = time.perf_counter()
    record_from = start + warmup
    stop = record_from + duration
    await asyncio.gather(
        *(
            _connection(
                host,
                port,
                path,
                i,
                connections,
                record_from,
                stop,
                stats,
                timeout,
                texts_per_request,
                repeat,
            )
            for i in range(connections)
        )
    )
    if events:
        with open(events, "w", encoding="utf-8") as f:
            for sent, answered, outcome in sorted(stats.events):
                key = "status" if isinstance(outcome, int) else "error"
                f.write(json.dumps({"sent": sent, "answered": answered, key: outcome}) + "\n")
    ok = stats.latency.get(200, [])
    everything = [s for v in stats.latency.values() for s in v]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    ms = 1000.0

    def pct(values: list[float], q: float) -> float | None:
        p = _percentile(values, q)
        return None if p is None else round(p * ms, 2)

    return {
        "connections": connections,
        "texts_per_request": texts_per_request,
        "duration_s": duration,
        "requests": len(everything),
        "statuses": {str(k): len(v) for k, v in sorted(stats.latency.items())},
        "errors": stats.errors,
        "ok_per_second": round(len(ok) / duration, 1),
        "ok_p50_ms": pct(ok, 0.50),
        "ok_p90_ms": pct(ok, 0.90),
        "ok_p99_ms": pct(ok, 0.99),
        "ok_max_ms": pct(ok, 1.0),
        "all_p99_ms": pct(everything, 0.99),
        "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=15.0, help="seconds recorded")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds sent, not recorded")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument(
        "--texts", type=int, default=1, help='texts per request (>1 sends {"texts": [...]})'
    )
    parser.add_argument(
        "--repeat", type=float, default=0.0, help="share of requests whose texts recur (0-1)"
    )
    parser.add_argument("--events", help="write every request as a JSON line to this file")
    args = parser.parse_args()
    result = asyncio.run(
        run(
            args.url,
            args.connections,
            args.duration,
            args.warmup,
            args.timeout,
            args.texts,
            args.repeat,
            args.events,
        )
    )
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
