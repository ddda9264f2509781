"""Long-running use: resident memory over many consecutive generations on one pipeline.

    python -m tests.bench.soak [--n 100] [--model BUNDLE]

Prints RSS after generation 10 and every 10 after; the bar (issue 8) is RSS after 100
within 5 % of RSS after 10. Exits 1 when it is missed.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

from edge_sdk import Pipeline
from edge_sdk.bench import process_memory


def rss_mb() -> float:
    return process_memory()["VmRSS"] / 2**20


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    pipe = Pipeline.load(args.model)
    prompts = ["a red circle on a blue background", "two small green squares at the top",
               "three purple triangles at the bottom", "a large yellow star on the left"]
    marks: dict[int, float] = {}
    t0 = time.perf_counter()
    for k in range(1, args.n + 1):
        pipe(prompts[k % len(prompts)], seed=k)
        if k % 10 == 0:
            gc.collect()
            marks[k] = rss_mb()
            print(f"after {k:4d} generations: RSS {marks[k]:7.1f} MB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    growth = marks[args.n] / marks[10] - 1
    print(f"RSS after {args.n} vs after 10: {100 * growth:+.2f} % (bar: within 5 %)")
    return 0 if abs(growth) <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
