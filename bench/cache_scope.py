"""What per-caller cache scope (``CACHE_SCOPE=caller``) costs in hit ratio, against ``shared``.

Runs the real :class:`aifn.core.cache.PredictionCache` (keys, scopes, an in-process LRU
backend) on a synthetic traffic mix, with a stand-in for the model (hit ratio does not
depend on it), so the figure is exact for the mix and takes seconds. The mix, per request
of one text:

* callers send unequal volumes: caller ``i`` (of ``--callers``) is picked with weight
  ``1 / (i + 1)`` (Zipf, s = 1): a few large tenants and a long tail;
* with probability ``--shared-fraction`` the text comes from one pool every caller draws on
  (``--shared-texts`` texts, Zipf s = 1.1: stock phrases, "Thanks!", a viral post quoted by many);
  otherwise from the caller's own pool (``--own-texts`` texts, Zipf s = 1.1: its retries, its
  templated notifications, the same ticket re-scored).

Only cross-caller repeats of the shared pool are lost to per-caller scope; a caller's own
repeats hit either way. Two capacities: unbounded (Redis sized for a day's TTL) and the
in-process default (``CACHE_MAX_ENTRIES`` 20,000), where per-caller scope also stores a popular
text once per caller and evicts sooner.

Usage: ``python bench/cache_scope.py [--requests 100000] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from bisect import bisect
from itertools import accumulate
from pathlib import Path
from typing import Any

from aifn.core.cache import MemoryBackend, PredictionCache, caller_scope
from aifn.core.model import Scores

UNBOUNDED = 10**9
IN_PROCESS = 20_000  # CACHE_MAX_ENTRIES' default
_SCORES = Scores((0.2, 0.3, 0.5), False)


class Zipf:
    """Ranks 0..n-1 with weight 1 / (rank + 1) ** s, drawn by bisecting the cumulative weights."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        self._cum = list(accumulate(1 / (k + 1) ** s for k in range(n)))
        self._rng = rng

    def __call__(self) -> int:
        return bisect(self._cum, self._rng.random() * self._cum[-1])


def run(args: argparse.Namespace, *, callers: int, shared_fraction: float) -> dict[str, Any]:
    """Hit ratio of each scope and capacity on one mix (the same requests for all four)."""
    rng = random.Random(args.seed)
    pick_caller = Zipf(callers, 1.0, rng)
    shared_text = Zipf(args.shared_texts, 1.1, rng)
    own_text = Zipf(args.own_texts, 1.1, rng)
    requests = []
    for _ in range(args.requests):
        caller = pick_caller()
        if rng.random() < shared_fraction:
            requests.append((caller, f"shared text {shared_text()}"))
        else:
            requests.append((caller, f"caller {caller} text {own_text()}"))

    out: dict[str, Any] = {"callers": callers, "shared_fraction": shared_fraction}
    for capacity in (UNBOUNDED, IN_PROCESS):
        for scope in ("shared", "caller"):
            cache = PredictionCache(
                MemoryBackend(capacity), namespace="sentiment:sha256:bench", ttl=86_400, scope=scope
            )
            for caller, text in requests:
                with caller_scope(f"key:{caller:012x}"):
                    cache.get_or_compute(
                        [text], params=None, width=3, compute=lambda t: [_SCORES] * len(t)
                    )
            name = "unbounded" if capacity == UNBOUNDED else "in_process"
            out[f"{name}_{scope}"] = cache.stats.hits / args.requests
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--shared-texts", type=int, default=50_000)
    parser.add_argument("--own-texts", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    started = time.perf_counter()
    results = [
        run(args, callers=callers, shared_fraction=fraction)
        for callers in (10, 100, 1000)
        for fraction in (0.1, 0.3, 0.5)
    ]
    print(
        f"{args.requests:,} one-text requests; own pool {args.own_texts:,} texts per caller, "
        f"shared pool {args.shared_texts:,} (Zipf 1.1); callers Zipf 1.0"
    )
    print(
        "| callers | from the shared pool | unbounded: shared | per caller | cost | "
        "in process (20,000): shared | per caller | cost |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        ub, uc = r["unbounded_shared"], r["unbounded_caller"]
        ms, mc = r["in_process_shared"], r["in_process_caller"]
        print(
            f"| {r['callers']:,} | {r['shared_fraction']:.0%} | {ub:.1%} | {uc:.1%} | "
            f"{100 * (ub - uc):.1f} pt | {ms:.1%} | {mc:.1%} | {100 * (ms - mc):.1f} pt |"
        )
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        machine = {"python": sys.version.split()[0], "platform": platform.platform()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {"machine": machine, "args": vars(args) | {"json": None}, "results": results},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
