"""How close the last live preview is to the image: PSNR after downscaling both to 16x16,
for each way the bundle can draw one (linear map, preview decoder, tiny decoder; all from the
same latents), over seeds (the default model's defaults: 20 steps).

    python -m tests.bench.preview_quality [--model BUNDLE] [--seeds 8]
"""

from __future__ import annotations

import argparse
import json
from typing import Callable

import numpy as np
from PIL import Image

from edge_sdk import Pipeline
from edge_sdk.preview import (latent_rgb_image, preview_decoder_image, preview_maker,
                              preview_source)

PROMPTS = ("a red circle on a blue background",
           "two small yellow stars at the top on a white background")
SIDE = 16


def psnr(a: Image.Image, b: Image.Image) -> float:
    small = [np.asarray(x.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BOX),
                        np.float64) for x in (a, b)]
    return float(10 * np.log10(255.0 ** 2 / np.mean((small[0] - small[1]) ** 2)))


def drawers(pipe: Pipeline) -> dict[str, Callable[[np.ndarray], Image.Image]]:
    """Every way this bundle can draw a preview from latents [B, C, h, w]."""
    vae = pipe.manifest.vae
    out = {"linear map": lambda z: latent_rgb_image(z[0], vae.latent_rgb, vae.scale_factor)}
    if vae.preview_decoder:
        out["preview decoder"] = lambda z: preview_decoder_image(z[0], vae.preview_decoder,
                                                                 vae.scale_factor)
    if vae.tiny_scaling_factor:
        out["tiny decoder"] = preview_maker(pipe.manifest, pipe.plan.mode, pipe.session, "tiny")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seeds", type=int, default=8)
    args = ap.parse_args()
    pipe = Pipeline.load(args.model)
    draw = drawers(pipe)
    values: dict[str, list[float]] = {k: [] for k in draw}
    for seed in range(args.seeds):
        last: list[np.ndarray] = []  # the latents after the last step: what it previews
        image = pipe(PROMPTS[seed % len(PROMPTS)], seed=seed,
                     callback=lambda i, n, z: last.append(z.copy()) if i + 1 == n else None)
        for name, make in draw.items():
            values[name].append(round(psnr(make(last[-1]), image), 1))
    out = {"auto": preview_source(pipe.manifest, pipe.plan.mode)}
    out.update({k: {"psnr_db": v, "min": min(v), "max": max(v)} for k, v in values.items()})
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
