"""The tiny decoder against the full one on the default model, paired: each prompt's latents
are generated once and decoded by both, so the two columns differ by the decoder alone.

    python -m tests.bench.decoder_quality [--model BUNDLE] [--validation] [--prompts 80]
        [--json FILE]

Prints each attribute's accuracy with each decoder (the shapes evaluator), and the paired
difference in whole-prompt accuracy with its standard error (of the per-prompt differences).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk.image import to_pil
from edge_sdk.shapes.benchmark import ATTRIBUTES, Report
from edge_sdk.shapes.scenes import HELD_OUT_SEED, VALIDATION_SEED, evaluation_prompts


def paired_se(a: list[bool], b: list[bool]) -> tuple[float, float]:
    """Mean and standard error, in points, of b - a over paired outcomes."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return 100 * float(d.mean()), 100 * se


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="bundle (default: the shipped model)")
    ap.add_argument("--validation", action="store_true", help="the 320-prompt-capable "
                    "validation set instead of the held-out one")
    ap.add_argument("--prompts", type=int, default=80)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe = Pipeline.load(args.model)
    cases = evaluation_prompts(args.prompts, VALIDATION_SEED if args.validation
                               else HELD_OUT_SEED)
    reports = {"full": Report(), "tiny": Report()}
    seconds = {"full": 0.0, "tiny": 0.0}
    for scene, prompt, seed in cases:
        latents = pipe.generate(prompt, GenerationConfig(seed=seed),
                                output_type="latent").latents
        for decoder, report in reports.items():
            t0 = time.perf_counter()
            pixels = pipe.decode_latents(latents, decoder=decoder)
            seconds[decoder] += time.perf_counter() - t0
            report.add(scene, prompt, seed, np.asarray(to_pil(pixels)[0]))
    whole = {k: [bool(r["score"]["whole"]) for r in rep.rows] for k, rep in reports.items()}
    diff, se = paired_se(whole["full"], whole["tiny"])
    out = {k: rep.summary()["accuracy"] for k, rep in reports.items()}
    out.update(prompts=len(cases), set="validation" if args.validation else "held-out",
               whole_diff_points=round(diff, 2), whole_diff_se_points=round(se, 2),
               decode_ms_mean={k: round(1000 * v / len(cases), 2) for k, v in seconds.items()})
    print(f"{out['set']} set, {len(cases)} prompts, the bundle's defaults; latents shared")
    print(f"{'attribute':<12}{'full':>8}{'tiny':>8}")
    for a in ATTRIBUTES:
        print(f"{a:<12}{out['full'][a]:>7.1f}%{out['tiny'][a]:>7.1f}%")
    print(f"whole, tiny - full: {diff:+.2f} points (paired standard error {se:.2f}); decode "
          f"{out['decode_ms_mean']['full']} ms (full) vs {out['decode_ms_mean']['tiny']} ms "
          "(tiny) per image")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
