"""fp16 bundles: run on the CPU provider, stay close to fp32, and are about half the size."""

from __future__ import annotations

import numpy as np

from edge_sdk import GenerationConfig, Manifest, Pipeline

from .conftest import needs_convert

pytestmark = needs_convert


def test_fp16_close_to_fp32_and_half_size(models):
    fp32, fp16 = models.bundle("tiny-sd1"), models.bundle("tiny-sd1", "fp16")
    latents = np.random.default_rng(5).standard_normal((1, 4, 8, 12)).astype(np.float32)
    cfg = GenerationConfig(steps=6, guidance_scale=5.0, width=96, height=64,
                           scheduler="euler", negative_prompt="blurry")
    images = []
    for bundle in (fp32, fp16):
        pipe = Pipeline.load(bundle)
        result = pipe.generate("a green triangle at the top", cfg, latents=latents)
        images.append(pipe.decode_latents(result.latents))
    err = float(np.abs(images[0] - images[1]).max())
    assert err <= 4 / 255, f"fp16 differs from fp32 by {err * 255:.2f}/255"
    m32, m16 = Manifest.load(fp32), Manifest.load(fp16)
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert m16.components[name].precision == "fp16"
        s32 = sum(f.size for f in m32.components[name].files)
        s16 = sum(f.size for f in m16.components[name].files)
        assert 0.4 < s16 / s32 < 0.6, f"{name}: fp16 is {s16 / s32:.2f} of fp32"
