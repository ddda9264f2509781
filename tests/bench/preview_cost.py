"""What a live preview costs beside a UNet step, measured in one generation.

    python -m tests.bench.preview_cost BUNDLE [--size 512] [--steps 3] [--memory fast]
        [--source map|tiny] [--preview-decoder FILE]

Runs one generation with a preview after every step, times each preview call (the picture
made from the latents, not what the caller does with it) and each UNet step (the time
between step callbacks, less the preview inside it), and prints the medians and their ratio.
`--source` forces what draws the previews (default: the pipeline's own choice).
`--preview-decoder FILE` puts that preview decoder in the loaded manifest, as if the bundle
had been converted with `--preview-decoder FILE` (its cost depends only on its layer shapes
and the latent size, so the default model's serves for an SD 1.5 bundle).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

from edge_sdk import GenerationConfig, Pipeline, Preview
from edge_sdk import pipeline as pipeline_module
from edge_sdk import preview as preview_module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--memory", default="fast")
    ap.add_argument("--source", choices=["auto", "map", "tiny"], default="auto")
    ap.add_argument("--preview-decoder", default=None, metavar="FILE")
    args = ap.parse_args()
    pipe = Pipeline.load(args.bundle, memory=args.memory)
    if args.preview_decoder:
        from converters.preview_fit import read_preview_decoder
        vae = pipe.manifest.vae
        layers = read_preview_decoder(args.preview_decoder, vae.latent_channels)
        pipe.manifest = replace(pipe.manifest, vae=replace(vae, preview_decoder=layers))
    source = preview_module.preview_source(pipe.manifest, pipe.plan.mode, args.source)
    previews: list[float] = []

    def timed_maker(*a):  # the preview's own work, timed
        make = preview_module.preview_maker(*a)

        def timed(latents):
            t0 = time.perf_counter()
            image = make(latents)
            previews.append(time.perf_counter() - t0)
            return image
        return timed
    pipeline_module.preview_maker = timed_maker  # type: ignore[assignment]
    stamps: list[float] = []
    cfg = GenerationConfig(steps=args.steps, width=args.size, height=args.size, seed=0)
    t0 = time.perf_counter()
    result = pipe.generate("a lighthouse at dusk", cfg,
                           preview=Preview(lambda step, image: stamps.append(
                               time.perf_counter()), 1, args.source))
    starts = [t0 + result.timings["prepare"] + result.timings["text_encoder"]] + stamps[:-1]
    steps = [b - a - p for a, b, p in zip(starts, stamps, previews)]
    out = {"bundle": args.bundle, "size": args.size, "memory": args.memory,
           "preview_ms_median": round(1000 * statistics.median(previews), 2),
           "unet_step_s_median": round(statistics.median(steps), 3),
           "preview_over_step_pct": round(100 * statistics.median(previews)
                                          / statistics.median(steps), 3),
           "previews": len(previews), "source": source,
           "preview_decoder": args.preview_decoder}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
