"""Time whole generations: median (and min/max) of N runs after one warm-up.

    python -m tests.bench.speed [--model BUNDLE] [--steps 20] [--runs 5] [--size 128]
        [--scheduler euler_a,dpmpp_2m] [--guidance 2,3]

Several comma-separated schedulers and/or guidance scales are timed in one process, in
turn, for side-by-side ratios (default: the bundle's own).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from edge_sdk import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scheduler", default=None, help="comma-separated, e.g. euler_a,dpmpp_2m")
    ap.add_argument("--guidance", default=None, help="comma-separated, e.g. 2,3")
    args = ap.parse_args()
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.model, threads=args.threads)
    load = time.perf_counter() - t0
    scheds = args.scheduler.split(",") if args.scheduler else [None]
    guides = [float(g) for g in args.guidance.split(",")] if args.guidance else [None]
    for sched in scheds:
        for g in guides:
            kw = dict(steps=args.steps, width=args.size, height=args.size,
                      scheduler=sched, guidance_scale=g)
            time_one(pipe, kw, args, load)


def time_one(pipe: Pipeline, kw: dict, args: argparse.Namespace, load: float) -> None:
    pipe("a red circle on a blue background", seed=0, **kw)  # warm-up
    totals, stages = [], []
    for k in range(args.runs):
        r = pipe.generate("a red circle on a blue background",
                          __import__("edge_sdk").GenerationConfig(seed=k, **kw))
        totals.append(sum(r.timings.values()))
        stages.append(r.timings)
    size = f"{r.config.width}x{r.config.height}"
    print(f"{pipe.manifest.source.name}: {args.steps} steps at {size}, guidance "
          f"{r.config.guidance_scale}, {r.config.scheduler}, on {platform.machine()} "
          f"({args.threads or 'all'} threads); load {load:.2f} s")
    print(f"total median {statistics.median(totals):.3f} s (min {min(totals):.3f}, max "
          f"{max(totals):.3f}) over {args.runs} runs; per stage median: " + ", ".join(
              f"{k} {statistics.median(s[k] for s in stages):.3f} s" for k in stages[0]))


if __name__ == "__main__":
    main()
