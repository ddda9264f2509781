"""Feature caching against every step whole on the default model, paired: each prompt is
generated with the same seed both ways, so the two columns differ by the caching alone.

    python -m tests.bench.cache_quality [--model BUNDLE] [--validation] [--prompts 320]
        [--interval 3] [--steps N] [--json FILE]

Prints each attribute's accuracy both ways (the shapes evaluator), the paired difference in
whole-prompt accuracy with its standard error, the UNet time per image both ways and the
PSNR of each cached image against its uncached twin (median and worst).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk.shapes.benchmark import ATTRIBUTES, Report
from edge_sdk.shapes.scenes import HELD_OUT_SEED, VALIDATION_SEED, evaluation_prompts

from .decoder_quality import paired_se


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0 ** 2 / mse))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    ap.add_argument("--validation", action="store_true", help="the validation set instead "
                    "of the held-out one")
    ap.add_argument("--prompts", type=int, default=80)
    ap.add_argument("--interval", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe = Pipeline.load(args.model)
    cases = evaluation_prompts(args.prompts, VALIDATION_SEED if args.validation
                               else HELD_OUT_SEED)
    runs = {"whole": 1, "cached": args.interval}
    reports = {k: Report() for k in runs}
    seconds = {k: 0.0 for k in runs}
    psnrs = []
    for scene, prompt, seed in cases:
        images = {}
        for name, interval in runs.items():
            g = pipe.generate(prompt, GenerationConfig(seed=seed, steps=args.steps,
                                                       cache_interval=interval))
            seconds[name] += g.timings["denoise"]
            images[name] = np.asarray(g.images[0])
            reports[name].add(scene, prompt, seed, images[name])
        psnrs.append(psnr(images["whole"], images["cached"]))
    whole = {k: [bool(r["score"]["whole"]) for r in rep.rows] for k, rep in reports.items()}
    diff, se = paired_se(whole["whole"], whole["cached"])
    out = {k: rep.summary()["accuracy"] for k, rep in reports.items()}
    finite = [p for p in psnrs if np.isfinite(p)]
    out.update(prompts=len(cases), set="validation" if args.validation else "held-out",
               interval=args.interval, whole_diff_points=round(diff, 2),
               whole_diff_se_points=round(se, 2),
               denoise_ms_mean={k: round(1000 * v / len(cases), 2) for k, v in seconds.items()},
               psnr_db_median=round(float(np.median(finite)), 1) if finite else None,
               psnr_db_worst=round(min(finite), 1) if finite else None)
    print(f"{out['set']} set, {len(cases)} prompts, the bundle's defaults, cache_interval "
          f"{args.interval} vs every step whole; seeds shared")
    print(f"{'attribute':<12}{'whole':>8}{'cached':>8}")
    for a in ATTRIBUTES:
        print(f"{a:<12}{out['whole'][a]:>7.1f}%{out['cached'][a]:>7.1f}%")
    print(f"whole prompt, cached - whole: {diff:+.2f} points (paired standard error {se:.2f}); "
          f"denoise {out['denoise_ms_mean']['whole']} ms vs {out['denoise_ms_mean']['cached']}"
          f" ms per image; PSNR cached vs whole: median {out['psnr_db_median']} dB, worst "
          f"{out['psnr_db_worst']} dB")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
