"""Print the measured parity of edge-sdk bundles with diffusers (issue 2's figures).

    python -m tests.bench.parity_report [--workdir DIR]

Builds the tiny SD 1.x/2.x-style checkpoints, converts them (fp32 and fp16), and prints the
max abs image difference vs StableDiffusionPipeline per scheduler at 96x64, the fp16 vs fp32
difference and size ratio, and conversion / generation times.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    import diffusers
    import torch

    from converters.convert import convert
    from converters.synth import build_checkpoint
    from edge_sdk import GenerationConfig, Manifest, Pipeline
    from tests.test_parity_diffusers import SCHEDULERS

    root = Path(args.workdir or tempfile.mkdtemp(prefix="parity-"))
    prompt, neg, W, H, steps, g = "a red circle on a blue background", "blurry", 96, 64, 8, 7.5
    print(f"{'checkpoint':<10} {'scheduler':<16} {'max |diff| image (x/255)':>26} "
          f"{'max |diff| latents':>19}")
    for arch in ("tiny-sd1", "tiny-sd2"):
        ckpt = build_checkpoint(root / arch, arch)
        t0 = time.perf_counter()
        convert(ckpt, root / f"{arch}-fp32", overwrite=True)
        t_conv = time.perf_counter() - t0
        convert(ckpt, root / f"{arch}-fp16", precision="fp16", overwrite=True)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(
            ckpt, local_files_only=True, safety_checker=None, requires_safety_checker=False)
        ref.set_progress_bar_config(disable=True)
        base_sched = ref.scheduler.config
        pipe = Pipeline.load(root / f"{arch}-fp32")
        lat = np.random.default_rng(7).standard_normal((1, 4, H // 8, W // 8)).astype(np.float32)
        for name, (cls, over) in SCHEDULERS.items():
            ref.scheduler = getattr(diffusers, cls).from_config(base_sched, **over)
            kw = dict(negative_prompt=neg, latents=torch.from_numpy(lat), height=H, width=W,
                      num_inference_steps=steps, guidance_scale=g)
            with torch.no_grad():
                want_lat = ref(prompt, output_type="latent", **kw).images.numpy()
                want = ref(prompt, output_type="np", **kw).images
            r = pipe.generate(prompt, GenerationConfig(negative_prompt=neg, steps=steps,
                              guidance_scale=g, width=W, height=H, scheduler=name), latents=lat)
            got = pipe.decode_latents(r.latents)
            print(f"{arch:<10} {name:<16} {np.abs(got - want).max() * 255:26.4f} "
                  f"{np.abs(r.latents - want_lat).max():19.2e}")
        p16 = Pipeline.load(root / f"{arch}-fp16")
        cfg = GenerationConfig(negative_prompt=neg, steps=steps, guidance_scale=g, width=W,
                               height=H, scheduler="euler")
        a = pipe.decode_latents(pipe.generate(prompt, cfg, latents=lat).latents)
        b = p16.decode_latents(p16.generate(prompt, cfg, latents=lat).latents)
        m32, m16 = Manifest.load(root / f"{arch}-fp32"), Manifest.load(root / f"{arch}-fp16")
        ratios = {c: sum(f.size for f in m16.components[c].files)
                  / sum(f.size for f in m32.components[c].files) for c in m32.components}
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            pipe("a red circle", steps=20, seed=0)
            times.append(time.perf_counter() - t0)
        print(f"{arch}: fp16 vs fp32 image max |diff| {np.abs(a - b).max() * 255:.3f}/255; "
              f"fp16/fp32 size " + ", ".join(f"{c} {v:.2f}" for c, v in ratios.items())
              + f"; convert fp32 {t_conv:.1f} s; 20 steps at 64x64 (CFG) median "
              f"{statistics.median(times):.3f} s")


if __name__ == "__main__":
    main()
