"""The shipped few-step model against the 20-step default, side by side in one process:
time per image (load excluded: text encoder + steps + decode) and, optionally, the held-out
scores of both.

    python -m tests.bench.few_step_default [--runs 20] [--score]

Each model generates the same prompts with the same seeds, alternating, after a warm-up;
medians are printed with the ratio. `--score` also runs the held-out set (80 prompts) on
both, as `edge-sdk evaluate --model NAME` does.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk.shapes.benchmark import run
from edge_sdk.shapes.scenes import HELD_OUT_SEED, evaluation_prompts

MODELS = ("shapes", "shapes-lcm")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--score", action="store_true")
    args = ap.parse_args()
    pipes = {name: Pipeline.load(name) for name in MODELS}
    cases = evaluation_prompts(args.runs, HELD_OUT_SEED)
    seconds: dict[str, list[float]] = {name: [] for name in MODELS}
    for name, pipe in pipes.items():  # warm-up
        pipe.generate(cases[0][1], GenerationConfig(seed=0))
    for _, prompt, seed in cases:
        for name, pipe in pipes.items():
            r = pipe.generate(prompt, GenerationConfig(seed=seed))
            seconds[name].append(sum(v for s, v in r.timings.items() if s != "prepare"))
    med = {name: statistics.median(v) for name, v in seconds.items()}
    for name, pipe in pipes.items():
        d = pipe.manifest.defaults
        print(f"{name:<11} {d.steps:>2} steps, guidance {d.guidance_scale:g}: median "
              f"{1000 * med[name]:.1f} ms per image over {len(cases)} prompts")
    print(f"shapes / shapes-lcm: {med['shapes'] / med['shapes-lcm']:.2f}x")
    if args.score:
        for name, pipe in pipes.items():
            report, _ = run(lambda p, s: pipe(p, seed=s), None)
            acc = report.summary()["accuracy"]
            print(f"{name:<11} held-out: " + ", ".join(f"{k} {v:.1f} %" for k, v in acc.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
