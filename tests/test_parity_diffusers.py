"""The fp32 bundle reproduces diffusers' StableDiffusionPipeline for the same checkpoint,
prompts and initial latents, for each deterministic scheduler, on SD 1.x- and 2.x-style tiny
checkpoints, at a non-square size."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk import GenerationConfig, Pipeline

from .conftest import needs_convert

pytestmark = needs_convert

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
WIDTH, HEIGHT = 96, 64  # 12 x 8 latents: non-square
SCHEDULERS = {  # our name -> (diffusers class, from_config overrides)
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def _diffusers(checkpoint, scheduler, latents, guidance, steps):
    import diffusers
    import torch
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        checkpoint, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    cls, overrides = SCHEDULERS[scheduler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, latents=torch.from_numpy(latents),
                   num_inference_steps=steps, guidance_scale=guidance, height=HEIGHT,
                   width=WIDTH, output_type="np")
    return out.images


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sd2"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_image_matches_diffusers(models, arch, scheduler, tmp_path):
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    guidance, steps = 7.5, 8
    want = _diffusers(models.checkpoint(arch), scheduler, latents, guidance, steps)
    pipe = Pipeline.load(models.bundle(arch))
    result = pipe.generate(PROMPT, GenerationConfig(
        negative_prompt=NEGATIVE, steps=steps, guidance_scale=guidance, width=WIDTH,
        height=HEIGHT, scheduler=scheduler), latents=latents)
    got = pipe.decode_latents(result.latents)
    assert got.shape == want.shape == (1, HEIGHT, WIDTH, 3)
    assert result.images[0].size == (WIDTH, HEIGHT)
    err = float(np.abs(got - want).max())
    assert err <= 2 / 255, f"{arch}/{scheduler}: max abs diff {err * 255:.2f}/255"
    # and the 8-bit images, as users see them
    ref8 = (want[0] * 255).round().astype(np.int16)
    assert np.abs(np.asarray(result.images[0], dtype=np.int16) - ref8).max() <= 2


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sd2"])
def test_no_guidance_matches_diffusers(models, arch):
    """guidance <= 1 skips the unconditional pass (Turbo-style models) and still matches."""
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 12)).astype(np.float32)
    want = _diffusers(models.checkpoint(arch), "euler", latents, guidance=1.0, steps=4)
    pipe = Pipeline.load(models.bundle(arch))
    calls = []
    unet = pipe.session("unet")
    original = unet.run
    unet.run = lambda feeds: calls.append(feeds["sample"].shape[0]) or original(feeds)
    result = pipe.generate(PROMPT, GenerationConfig(
        negative_prompt=NEGATIVE, steps=4, guidance_scale=1.0, width=WIDTH, height=HEIGHT,
        scheduler="euler"), latents=latents)
    assert calls == [1, 1, 1, 1]  # batch 1: no unconditional half
    got = pipe.decode_latents(result.latents)
    assert float(np.abs(got - want).max()) <= 2 / 255
