"""How close the last live preview is to the image: PSNR after downscaling both to 16x16,
per preview source, over seeds (the default model's defaults: 20 steps).

    python -m tests.bench.preview_quality [--model BUNDLE] [--seeds 8]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from PIL import Image

from edge_sdk import Pipeline, Preview

PROMPTS = ("a red circle on a blue background",
           "two small yellow stars at the top on a white background")
SIDE = 16


def psnr(a: Image.Image, b: Image.Image) -> float:
    small = [np.asarray(x.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BOX),
                        np.float64) for x in (a, b)]
    return float(10 * np.log10(255.0 ** 2 / np.mean((small[0] - small[1]) ** 2)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    pipe = Pipeline.load(args.model)
    sources = ["map"] + (["tiny"] if pipe.manifest.vae.tiny_scaling_factor else [])
    out = {}
    for source in sources:
        values = []
        for seed in range(args.seeds):
            last: list[Image.Image] = []
            image = pipe(PROMPTS[seed % len(PROMPTS)], seed=seed,
                         preview=Preview(lambda s, im: last.append(im), 10 ** 6, source))
            values.append(round(psnr(last[-1], image), 1))
        out[source] = {"psnr_db": values, "min": min(values), "max": max(values)}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
