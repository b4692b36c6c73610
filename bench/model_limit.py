"""The model's own limit: texts/s in one process, no HTTP, as the function's workers run it.

Loads the model as the function does (the served graph, ``MODEL_WORKERS`` threads each running
texts alone on one intra-op thread) and keeps every worker busy for ``--duration`` seconds with
the texts ``bench/loadgen.py`` sends (a sample review plus a serial number, never repeated).
Prints JSON: texts/s and the settings. ``bench/load.py`` runs it in the same run as the servers,
so "how close the server comes to its model" is a ratio of two figures from the same minutes.

Usage: ``python bench/model_limit.py [--model-dir DIR] [--workers N] [--duration S]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from pathlib import Path

from benchlib import REPO
from loadgen import SAMPLES

from aifn.core.model import TextClassifier
from aifn.settings import cpu_count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "sentiment")
    parser.add_argument("--workers", type=int, default=cpu_count())
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()

    model = TextClassifier.load(args.model_dir, max_tokens=256, threads=1)
    serial = itertools.count()
    lock = threading.Lock()
    done = [0] * args.workers
    start = time.monotonic() + args.warmup
    stop = start + args.duration

    def work(worker: int) -> None:
        while (now := time.monotonic()) < stop:
            with lock:
                n = next(serial)
            model.scores([f"{SAMPLES[n % len(SAMPLES)]} (#{n})"])
            if now >= start:
                done[worker] += 1

    threads = [threading.Thread(target=work, args=(w,)) for w in range(args.workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = {
        "texts_per_second": round(sum(done) / args.duration, 1),
        "workers": args.workers,
        "intra_op_threads": 1,
        "graph_plan": model.plan or "float32",
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
