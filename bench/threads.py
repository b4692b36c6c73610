"""How to spend an instance's vCPUs on the model: workers, intra-op threads, spinning.

For each configuration, in one process and side by side (the configurations take turns, round
after round, so a noisy neighbour slows them alike; each keeps its best round):

* **lone text**: the median latency of one text at a time, the latency a request alone sees;
* **busy**: texts/s with every worker kept busy, what an instance under load can do.

Configurations: ``W x T``: W model workers (threads calling the session, as the function's
batcher does) with T ONNX Runtime intra-op threads each, spinning off (the function's setting)
or on. Texts are the load generator's (a sample review plus a serial number).

Usage: ``python bench/threads.py [--model-dir DIR] [--rounds 3] [--seconds 4] [--json F]``
(``make bench-threads``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import onnxruntime
from benchlib import REPO
from loadgen import SAMPLES

from aifn.core.model import (
    ModelIdentity,
    TextClassifier,
    Tokenizer,
    read_config,
    served_graph,
    session_options,
)

CONFIGS = [  # (workers, intra-op threads, spinning)
    (2, 1, False),
    (1, 2, False),
    (1, 2, True),
    (1, 1, False),
]


class Config:
    def __init__(self, model_dir: Path, workers: int, threads: int, spinning: bool) -> None:
        self.workers, self.threads, self.spinning = workers, threads, spinning
        options = session_options(threads)
        if spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        graph, plan = served_graph(model_dir, "auto")
        session = onnxruntime.InferenceSession(
            str(model_dir / graph), options, providers=["CPUExecutionProvider"]
        )
        # The served model's own code around a session with this configuration's options.
        self.model = TextClassifier(
            session,
            Tokenizer(model_dir, 256),
            ModelIdentity(model_dir.name, graph),
            read_config(model_dir),
            max_tokens=256,
            plan=plan,
        )
        self.serial = itertools.count()
        self.lone: list[float] = []
        self.busy: list[float] = []

    @property
    def name(self) -> str:
        return f"{self.workers} x {self.threads}" + (", spinning" if self.spinning else "")

    def run(self, text: str) -> None:
        self.model.forward([text])

    def text(self) -> str:
        n = next(self.serial)
        return f"{SAMPLES[n % len(SAMPLES)]} (#{n})"

    def measure_lone(self, seconds: float) -> None:
        latencies = []
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            text = self.text()
            started = time.perf_counter()
            self.run(text)
            latencies.append(time.perf_counter() - started)
        self.lone.append(statistics.median(latencies) * 1000)

    def measure_busy(self, seconds: float) -> None:
        done = [0] * self.workers
        stop = time.monotonic() + seconds

        def work(w: int) -> None:
            while time.monotonic() < stop:
                self.run(self.text())
                done[w] += 1

        threads = [threading.Thread(target=work, args=(w,)) for w in range(self.workers)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.busy.append(sum(done) / (time.perf_counter() - started))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "sentiment")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    configs = [Config(args.model_dir, *c) for c in CONFIGS]
    for config in configs:
        for _ in range(20):  # warm-up
            config.run(config.text())
    for _ in range(args.rounds):
        for config in configs:
            config.measure_lone(args.seconds)
            config.measure_busy(args.seconds)
    cpus = len(os.sched_getaffinity(0))
    print(f"\n{args.model_dir.name}, {platform.machine()}, {cpus} CPUs, best of {args.rounds}\n")
    print("| workers x intra-op threads | lone text, median | busy, texts/s |")
    print("|---|---|---|")
    rows: list[dict[str, Any]] = []
    for config in configs:
        lone, busy = min(config.lone), max(config.busy)
        print(f"| {config.name} | {lone:.2f} ms | {busy:.0f} |")
        rows.append({"config": config.name, "lone_ms": round(lone, 2), "busy_tps": round(busy)})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpus": cpus, "configs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
