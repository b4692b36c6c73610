"""Throughput under concurrency: our sentiment function against the seed's naive pattern.

In one run, side by side on the same machine and the same model directory:

* **ours**: ``functions-framework --target sentiment`` as ``make serve`` runs it (gunicorn, one
  worker, the defaults for threads, model workers, backpressure and the int8 graph on ONNX
  Runtime), prediction cache off (every text is new anyway);
* **baseline**: ``bench/baseline_app.py``, the seed article's FastAPI app: a ``transformers``
  pipeline called once per request, one request at a time.

For each, it measures the cold start (process start -> first successful prediction) with the
machine otherwise idle (the median of ``--cold-starts`` alternating starts), then drives it
with ``bench/loadgen.py`` (a second process, closed loop, keep-alive, a new text every request)
at each connection count, alternating the two servers at each step; then at 4x the saturating
load (4x the fewest connections that reach 95% of our peak throughput). Reported per run:
successful requests/s, p50/p99 latency of the successful requests, every status and connection
error, and the peak memory (PSS of the process tree). In the same run, ``bench/model_limit.py``
measures the model's own texts/s in one process without HTTP (as many workers as ours runs), the
ceiling our server's requests/s is compared with.

Usage: ``python bench/load.py [--connections 1,8,32,64] [--duration 15] [--json F] [--plot F]``
(``make bench-load``). The machine is shared and noisy: read the ratios, not the absolute figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import BIN, REPO, free_port, process_tree, start_function

HERE = Path(__file__).resolve().parent
_SEQ = itertools.count()


def memory_mb(root: int, pids: list[int] | None = None) -> float:
    """Memory of a process tree: the sum of each process's PSS.

    PSS, not RSS: gunicorn forks its worker from a master that already holds the model, and the
    pages they share would count twice in a sum of RSS. ``pids``: the tree, if already known.
    """
    total = 0
    for pid in pids if pids is not None else process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total / 1024


class PeakMemory:
    """Samples a process tree's memory every 0.2 s in a thread; ``peak`` is the largest seen.

    Cheap on purpose, since it shares the CPUs with the server it measures: the tree (a scan of
    /proc) is listed again only every 2 s, and only the tree's PSS is read in between.
    """

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        listed = 0.0
        pids: list[int] = []
        while not self._stop.is_set():
            if time.monotonic() - listed > 2.0:
                pids, listed = process_tree(self.pid), time.monotonic()
            self.peak = max(self.peak, memory_mb(self.pid, pids))
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Server:
    name: str
    url: str
    body: dict[str, str]
    start: Any  # () -> Popen
    proc: subprocess.Popen[bytes] | None = None
    cold_starts: list[float] = field(default_factory=list)
    idle_mb: float = 0.0
    runs: list[dict[str, Any]] = field(default_factory=list)

    def launch(self) -> None:
        """Start the process and time it to the first successful prediction."""
        started = time.perf_counter()
        self.proc = self.start()
        data = json.dumps(self.body).encode()
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name}: server exited with {self.proc.returncode}")
            request = urllib.request.Request(
                self.url, data=data, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    response.read()
                    if response.status == 200:
                        break
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.02)
        self.cold_starts.append(time.perf_counter() - started)
        time.sleep(1)
        self.idle_mb = memory_mb(self.proc.pid)

    @property
    def cold_start_s(self) -> float:
        """The median of the cold starts measured."""
        return statistics.median(self.cold_starts)

    def batching(self) -> dict[str, Any] | None:
        """Our function's batching counters (``GET /v1/health``); None for the baseline."""
        if self.name != "ours":
            return None
        health = self.url.split("/v1/")[0] + "/v1/health"
        with urllib.request.urlopen(health, timeout=10) as response:
            stats: dict[str, Any] = json.loads(response.read())["batching"]
            return stats

    def load(
        self, connections: int, duration: float, warmup: float, texts: int = 1
    ) -> dict[str, Any]:
        assert self.proc is not None
        before = self.batching()
        with PeakMemory(self.proc.pid) as memory:
            out = subprocess.run(
                [
                    sys.executable,
                    str(HERE / "loadgen.py"),
                    self.url,
                    f"--connections={connections}",
                    f"--duration={duration}",
                    f"--warmup={warmup}",
                    f"--texts={texts}",
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        result: dict[str, Any] = json.loads(out)
        result["peak_memory_mb"] = round(memory.peak, 1)
        result["seq"] = next(_SEQ)
        after = self.batching()
        if before and after:
            batches = after["batches"] - before["batches"]
            result["mean_batch"] = round((after["texts"] - before["texts"]) / max(batches, 1), 1)
        self.runs.append(result)
        return result

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def ours(port: int, model_dir: Path, extra_env: dict[str, str]) -> Server:
    return Server(
        "ours",
        f"http://127.0.0.1:{port}/v1/analyze/sentiment",
        {"text": "The support team answered quickly and solved my problem."},
        lambda: start_function(
            "sentiment",
            port,
            {"CACHE_MAX_ENTRIES": "0", "MODEL_DIR": str(model_dir), **extra_env},
        ),
    )


def baseline(port: int, model_dir: Path) -> Server:
    env = {**os.environ, "MODEL_DIR": str(model_dir), "HF_HUB_OFFLINE": "1"}
    command = [
        str(BIN / "python"),
        "-m",
        "uvicorn",
        "baseline_app:app",
        f"--app-dir={HERE}",
        "--host=127.0.0.1",
        f"--port={port}",
        "--log-level=warning",
        "--no-access-log",
    ]
    return Server(
        "baseline",
        f"http://127.0.0.1:{port}/analyze",
        {"text": "The support team answered quickly and solved my problem."},
        lambda: subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ),
    )


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.1f}{unit}"


def _statuses(run: dict[str, Any]) -> str:
    parts = [f"{n}x{code}" for code, n in run["statuses"].items()]
    parts += [f"{n} {kind} errors" for kind, n in run["errors"].items()]
    return ", ".join(parts) or "none"


def table(servers: list[Server]) -> str:
    """One row per run, in the order they ran (so each level's pair sits together)."""
    lines = [
        "| connections | server | requests/s | p50 | p99 | responses | peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = sorted(((r["seq"], s.name, r) for s in servers for r in s.runs), key=lambda t: t[0])
    for _, name, r in rows:
        n = r.get("texts_per_request", 1)
        label = f"{r['connections']}" + (" (4x saturation)" if r.get("overload") else "")
        label += f", {n} texts/request" if n > 1 else ""
        lines.append(
            f"| {label} | {name} | {_fmt(r['ok_per_second'])} | {_fmt(r['ok_p50_ms'], ' ms')} "
            f"| {_fmt(r['ok_p99_ms'], ' ms')} | {_statuses(r)} | {r['peak_memory_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def verdicts(
    us: Server, base: Server, model_limit: float | None = None
) -> list[tuple[str, float, float, bool]]:
    """(check, measured ratio, target, passed) for each figure docs/performance.md reports."""

    def at(server: Server, connections: int) -> dict[str, Any] | None:
        return next(
            (r for r in server.runs if r["connections"] == connections and not r.get("overload")),
            None,
        )

    out = []
    u32, b32, u1, b1 = at(us, 32), at(base, 32), at(us, 1), at(base, 1)
    if u32 and b32:
        ratio = u32["ok_per_second"] / max(b32["ok_per_second"], 1e-9)
        out.append(("requests/s at 32 connections, ours / baseline", ratio, 4.0, ratio >= 4.0))
        ratio = (u32["ok_p99_ms"] or 1e9) / max(b32["ok_p99_ms"] or 1e-9, 1e-9)
        out.append(("p99 at 32 connections, ours / baseline", ratio, 0.33, ratio <= 0.33))
    if u32 and model_limit:
        ratio = u32["ok_per_second"] / model_limit
        out.append(
            ("requests/s at 32 connections / the model's own texts/s", ratio, 0.8, ratio >= 0.8)
        )
    if u1 and b1:
        ratio = (u1["ok_p50_ms"] or 1e9) / max(b1["ok_p50_ms"] or 1e-9, 1e-9)
        out.append(("median at 1 connection, ours / baseline", ratio, 0.6, ratio <= 0.6))
    ratio = us.cold_start_s / base.cold_start_s
    out.append(("cold start, ours / baseline", ratio, 0.3, ratio <= 0.3))
    for over in (r for r in us.runs if r.get("overload")):
        clean = set(over["statuses"]) <= {"200", "429"} and not over["errors"]
        n = over.get("texts_per_request", 1)
        out.append((f"4x saturation ({n} text(s)/request): only 200 and 429", 1.0, 1.0, clean))
    return out


def measure_model_limit(model_dir: Path, duration: float, extra_env: dict[str, str]) -> float:
    """The model's texts/s in one process (bench/model_limit.py), as many workers as ours."""
    command = [
        sys.executable,
        str(HERE / "model_limit.py"),
        f"--model-dir={model_dir}",
        f"--duration={duration}",
    ]
    if "MODEL_WORKERS" in extra_env:
        command.append(f"--workers={extra_env['MODEL_WORKERS']}")
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return float(result["texts_per_second"])


def plot(servers: list[Server], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for s, style in zip(servers, ("o-", "s--"), strict=True):
        runs = [r for r in s.runs if not r.get("overload")]
        x = [r["connections"] for r in runs]
        left.plot(x, [r["ok_per_second"] for r in runs], style, label=s.name)
        right.plot(x, [r["ok_p99_ms"] for r in runs], style, label=s.name)
    for ax, title in ((left, "successful requests/s"), (right, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    right.set_yscale("log")
    fig.suptitle(f"sentiment, one instance: {machine}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", default="1,8,32,64")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds recorded per run")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds sent, not recorded")
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "sentiment")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for our function (repeatable), e.g. --env BATCH_WAIT_MS=2",
    )
    parser.add_argument(
        "--servers", default="ours,baseline", help="which to run (e.g. ours, to tune settings)"
    )
    parser.add_argument("--no-overload", action="store_true", help="skip the 4x saturation run")
    parser.add_argument(
        "--cold-starts", type=int, default=3, help="cold starts per server (median reported)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--plot", type=Path, help="also draw them here (PNG)")
    args = parser.parse_args()
    levels = [int(c) for c in args.connections.split(",")]

    cpus = len(os.sched_getaffinity(0))
    machine = (
        f"{platform.machine()}, {cpus} CPUs, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}"
    )
    extra_env = dict(item.split("=", 1) for item in args.env)
    makers = {
        "ours": lambda: ours(free_port(), args.model_dir, extra_env),
        "baseline": lambda: baseline(free_port(), args.model_dir),
    }
    servers = [makers[name]() for name in args.servers.split(",")]
    try:
        # One at a time, each on an otherwise idle machine, alternating; the last start stays up.
        for attempt in range(args.cold_starts):
            for s in servers:
                s.launch()
                print(f"{s.name}: cold start {s.cold_starts[-1]:.2f} s, idle {s.idle_mb:.0f} MB")
                if attempt < args.cold_starts - 1:
                    s.stop()
        for c in levels:
            for s in servers:
                r = s.load(c, args.duration, args.warmup)
                print(
                    f"{s.name:>8} {c:>4} conns: {r['ok_per_second']:>7.1f} req/s  "
                    f"p50 {_fmt(r['ok_p50_ms'], ' ms')}  p99 {_fmt(r['ok_p99_ms'], ' ms')}  "
                    f"[{_statuses(r)}]  peak {r['peak_memory_mb']:.0f} MB"
                    + (f"  mean batch {r['mean_batch']}" if "mean_batch" in r else ""),
                    flush=True,
                )
        limit = None
        if "ours" in args.servers.split(","):
            limit = measure_model_limit(args.model_dir, args.duration, extra_env)
            print(f"   model {limit:>7.1f} texts/s in one process, no HTTP", flush=True)
        if not args.no_overload:
            peak = max(r["ok_per_second"] for r in servers[0].runs)
            saturating = next(
                r["connections"] for r in servers[0].runs if r["ok_per_second"] >= 0.95 * peak
            )
            # Single texts, both servers; then ours with 8-text requests, which fill the model's
            # queue (MAX_QUEUED_TEXTS) and meet backpressure (the baseline takes one text).
            runs = [(s, 1) for s in servers] + [(s, 8) for s in servers if s.name == "ours"]
            for s, texts in runs:
                r = s.load(4 * saturating, args.duration, args.warmup, texts=texts)
                r["overload"] = True
                print(
                    f"{s.name:>8} {4 * saturating:>4} conns (4x saturation, {texts} text(s)): "
                    f"{r['ok_per_second']:.1f} req/s  p99 {_fmt(r['ok_p99_ms'], ' ms')}  "
                    f"[{_statuses(r)}]  peak {r['peak_memory_mb']:.0f} MB",
                    flush=True,
                )
    finally:
        for s in servers:
            s.stop()

    print(f"\nsentiment, one instance, {machine}\n")
    print(table(servers))
    starts = ", ".join(
        f"{s.name} {s.cold_start_s:.2f} s (of {', '.join(f'{c:.2f}' for c in s.cold_starts)})"
        for s in servers
    )
    print(f"\ncold start (process start -> first prediction): {starts}\n")
    checks = verdicts(*servers, model_limit=limit) if len(servers) == 2 else []
    for name, value, target, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {value:.2f} (target {target})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": machine,
            "model_texts_per_second": limit,
            "servers": {
                s.name: {
                    "cold_start_s": s.cold_start_s,
                    "cold_starts_s": s.cold_starts,
                    "idle_mb": s.idle_mb,
                    "runs": s.runs,
                }
                for s in servers
            },
            "checks": [
                {"check": n, "value": round(v, 3), "target": t, "ok": ok} for n, v, t, ok in checks
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        plot(servers, args.plot, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
