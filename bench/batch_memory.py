"""Batch files: peak memory of processing a 1 GB single-line file and a 1M-line file.

Each file runs through the batch engine (``Processor.run_local``: the bounded line reader,
validation, chunking, both output files) in a fresh Python process, whose peak RSS
(``ru_maxrss``) is compared with the same process on a small file. The model is a stand-in (a
hash of the text, as in the unit tests): the serving model's own memory does not depend on the
file, and 1M texts through it would take the better part of an hour on 2 vCPUs; what is measured
is everything the batch path holds for a file.

Files (written to a temporary directory, removed afterwards):

* small: 1,000 lines of ticket-like texts (the baseline);
* 1M lines: 1,000,000 such lines (~97 MiB);
* 1 GB line: a good line, then one JSONL line of 1 GiB with no line break at the end of the file
  (a truncated export, or a file with no newline at all).

Usage: ``python bench/batch_memory.py [--lines 1000000] [--line-mib 1024] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEXTS = [
    "The invoice for last month was charged twice, please refund one of them.",
    "Love the new dashboard, it saves me an hour every morning!",
    "The export keeps failing with a timeout since the last release.",
    "Could you add a dark mode to the mobile app?",
    "Still waiting for my order after two weeks, this is unacceptable.",
]


def write_lines(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"t-{i}", "text": f"{TEXTS[i % len(TEXTS)]} (#{i})"}) + "\n")


def write_long_line(path: Path, mib: int) -> None:
    block = b"x" * (1 << 20)
    with open(path, "wb") as f:
        f.write(b'{"id": "first", "text": "A good line before the long one."}\n{"text": "')
        for _ in range(mib):
            f.write(block)  # no closing quote, no line break: the file just ends


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child(path: str) -> None:
    """Process one file with a stand-in model; print a JSON line of what it took."""
    from aifn.core.model import ModelIdentity, Prediction
    from aifn.files import processor as batch
    from aifn.files.processor import BatchSettings, Capability
    from aifn.files.storage import Location
    from aifn.settings import read_env

    def predict(texts: list[str], options: Any) -> list[Prediction]:
        out = []
        for text in texts:
            top = 0.5 + hashlib.sha256(text.encode()).digest()[0] / 512
            out.append(Prediction([("A", top), ("B", 1 - top)], truncated=False, cached=False))
        return out

    processor = batch.Processor(
        Capability(name="bench", model=ModelIdentity("stand-in", "sha256:0"), predict=predict),
        read_env(BatchSettings),
    )
    pred = Location(None, path + ".predictions.jsonl")
    outputs = batch.Outputs(pred, pred.sibling(batch.errors_name(pred.path)))
    before = rss_kib()
    started = time.perf_counter()
    summary = processor.run_local(Location(None, path), outputs)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "rss_before_kib": before,
                "peak_rss_kib": peak,
                "seconds": seconds,
                "records": summary.records,
                "predictions": summary.predictions,
                "errors": summary.errors,
            }
        )
    )


def measure(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["bytes"] = path.stat().st_size
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines of the long file")
    parser.add_argument("--line-mib", type=int, default=1024, help="MiB of the single line")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="aifn-batch-memory-") as tmp:
        files = [
            ("small (1,000 lines)", Path(tmp) / "small.jsonl", lambda p: write_lines(p, 1000)),
            (
                f"{args.lines:,} lines",
                Path(tmp) / "lines.jsonl",
                lambda p: write_lines(p, args.lines),
            ),
            (
                f"one {args.line_mib:,} MiB line, no line break",
                Path(tmp) / "line.jsonl",
                lambda p: write_long_line(p, args.line_mib),
            ),
        ]
        for label, path, make in files:
            make(path)
            result = measure(path)
            result["file"] = label
            rows.append(result)
            path.unlink()
            print(f"measured: {label}", file=sys.stderr)
    base = rows[0]["peak_rss_kib"]
    print(f"Python {platform.python_version()}, {platform.machine()}, stand-in model")
    print()
    print("| file | size | lines: predicted / errors | time | peak RSS | vs small file |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['file']} | {r['bytes'] / 2**20:,.1f} MiB | {r['predictions']:,} / "
            f"{r['errors']:,} | {r['seconds']:.1f} s | {r['peak_rss_kib'] / 1024:.1f} MiB | "
            f"{(r['peak_rss_kib'] - base) / 1024:+.1f} MiB |"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
