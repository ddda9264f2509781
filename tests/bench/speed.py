"""Time whole generations: median (and min/max) of N runs after one warm-up.

    python -m tests.bench.speed [--model BUNDLE[,BUNDLE...]] [--steps 20] [--runs 5]
        [--size 128] [--scheduler euler_a,dpmpp_2m] [--guidance 2,3]

Several comma-separated schedulers and/or guidance scales are timed in one process, in
turn, for side-by-side ratios (default: the bundle's own). Several bundles are loaded in
one process and their runs interleaved (run k of each, then run k+1), so a slower moment
of the machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from edge_sdk import Pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None,
                    help="bundle, or comma-separated bundles (default: the shipped model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scheduler", default=None, help="comma-separated, e.g. euler_a,dpmpp_2m")
    ap.add_argument("--guidance", default=None, help="comma-separated, e.g. 2,3")
    args = ap.parse_args()
    pipes, loads = [], []
    models = args.model.split(",") if args.model else [None]
    for model in models:
        t0 = time.perf_counter()
        pipes.append(Pipeline.load(model, threads=args.threads))
        loads.append(time.perf_counter() - t0)
    scheds = args.scheduler.split(",") if args.scheduler else [None]
    guides = [float(g) for g in args.guidance.split(",")] if args.guidance else [None]
    for sched in scheds:
        for g in guides:
            kw = dict(steps=args.steps, width=args.size, height=args.size,
                      scheduler=sched, guidance_scale=g)
            time_side_by_side(pipes, [m or "shapes" for m in models], kw, args, loads)


def time_side_by_side(pipes: list[Pipeline], labels: list[str], kw: dict,
                      args: argparse.Namespace, loads: list[float]) -> None:
    for pipe in pipes:
        pipe("a red circle on a blue background", seed=0, **kw)  # warm-up
    totals: list[list[float]] = [[] for _ in pipes]
    stages: list[list[dict]] = [[] for _ in pipes]
    results = []
    for k in range(args.runs):
        for i, pipe in enumerate(pipes):
            r = pipe.generate("a red circle on a blue background",
                              __import__("edge_sdk").GenerationConfig(seed=k, **kw))
            totals[i].append(sum(r.timings.values()))
            stages[i].append(r.timings)
            results.append(r)
    for i, pipe in enumerate(pipes):
        r = results[-len(pipes) + i]
        unet = pipe.manifest.components["unet"]
        mb = sum(f.size for f in unet.files) / 1e6
        print(f"{labels[i]} ({unet.format} UNet {unet.precision}, "
              f"{mb:.1f} MB): {args.steps} steps at {r.config.width}x{r.config.height}, "
              f"guidance {r.config.guidance_scale}, {r.config.scheduler}, on "
              f"{platform.machine()} ({args.threads or 'all'} threads); load {loads[i]:.2f} s")
        t = totals[i]
        print(f"total median {statistics.median(t):.3f} s (min {min(t):.3f}, max "
              f"{max(t):.3f}) over {args.runs} runs; per stage median: " + ", ".join(
                  f"{k} {statistics.median(s[k] for s in stages[i]):.3f} s"
                  for k in stages[i][0]))
        if i:
            print(f"  ratio to {labels[0]}: "
                  f"{statistics.median(t) / statistics.median(totals[0]):.2f}x")


if __name__ == "__main__":
    main()
