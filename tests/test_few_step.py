"""Few-step models as diffusers runs them: an LCM-distilled UNet (the guidance scale enters as
an embedding, `timestep_cond`, with no unconditional pass) against LatentConsistencyModelPipeline,
and a Turbo-style configuration (Euler ancestral, trailing spacing, 1 step, guidance 0)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edge_sdk import InvalidInputError, Manifest, Pipeline
from edge_sdk.denoise import guidance_embedding

from .conftest import needs_convert

pytestmark = needs_convert

PROMPT = "a red circle on a blue background"
WIDTH, HEIGHT = 104, 72
SHAPE = (1, 4, HEIGHT // 8, WIDTH // 8)


def test_the_guidance_embedding_is_diffusers():
    import torch
    from diffusers import LatentConsistencyModelPipeline
    for w, dim in ((7.5, 32), (0.0, 256), (3.0, 33)):
        want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, torch.tensor([w]), embedding_dim=dim).numpy()
        # float32 angles up to w x 1000 rad: exp/sin of another library differ by an ulp
        # of the angle (5e-4 rad at 7500)
        assert np.abs(guidance_embedding(w, dim, 2) - want).max() < 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_unet_matches_diffusers(models, steps, monkeypatch):
    """4 steps: LCM's scheduler draws noise after every step but the last; diffusers gets
    the draws our pipeline makes (its randn_tensor patched)."""
    import diffusers
    import torch
    from diffusers.schedulers import scheduling_lcm
    z = np.random.default_rng(21).standard_normal(SHAPE).astype(np.float32)
    seed, g = 4, 6.0
    rng = np.random.default_rng(seed)  # latents given: the steps draw first from the seed
    draws = [torch.from_numpy(rng.standard_normal(SHAPE, dtype=np.float32))
             for _ in range(steps)]
    monkeypatch.setattr(scheduling_lcm, "randn_tensor", lambda *a, **k: draws.pop(0))
    ref = diffusers.LatentConsistencyModelPipeline.from_pretrained(
        models.checkpoint("tiny-lcm"), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = ref(PROMPT, num_inference_steps=steps, guidance_scale=g, height=HEIGHT,
                   width=WIDTH, latents=torch.from_numpy(z.copy()), output_type="np").images
    pipe = Pipeline.load(models.bundle("tiny-lcm"))
    m = pipe.manifest
    assert m.unet.time_cond_proj_dim == 32 and m.defaults.steps == 4 \
        and m.defaults.guidance_scale == 8.5
    calls = []
    unet = pipe.session("unet")
    run = unet.run
    unet.run = lambda feeds: calls.append(sorted(feeds)) or run(feeds)
    got = np.asarray(pipe(PROMPT, steps=steps, guidance_scale=g, width=WIDTH, height=HEIGHT,
                          latents=z, seed=seed, output_type="np"))[None]
    assert len(calls) == steps and "timestep_cond" in calls[0]  # one pass per step
    err = float(np.abs(got - want).max())
    assert err <= 2 / 255, f"LCM {steps} steps: {err * 255:.2f}/255"
    with pytest.raises(InvalidInputError, match="takes no negative_prompt"):
        pipe(PROMPT, negative_prompt="blurry", steps=1)


def test_turbo_style_one_step_without_guidance_matches_diffusers(models, tmp_path):
    import diffusers
    import torch
    from converters.convert import convert
    ckpt = tmp_path / "turbo"
    shutil.copytree(models.checkpoint("tiny-sd2"), ckpt)
    sched = ckpt / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg.update(_class_name="EulerAncestralDiscreteScheduler", timestep_spacing="trailing")
    sched.write_text(json.dumps(cfg))
    index = json.loads((ckpt / "model_index.json").read_text())  # diffusers loads this class
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    (ckpt / "model_index.json").write_text(json.dumps(index))
    convert(ckpt, tmp_path / "bundle")
    assert (Manifest.load(tmp_path / "bundle").defaults.steps,
            Manifest.load(tmp_path / "bundle").defaults.guidance_scale) == (1, 0.0)
    z = np.random.default_rng(22).standard_normal(SHAPE).astype(np.float32)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        ckpt, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = ref(PROMPT, num_inference_steps=1, guidance_scale=0.0, height=HEIGHT,
                   width=WIDTH, latents=torch.from_numpy(z.copy()), output_type="np").images
    got = np.asarray(Pipeline.load(tmp_path / "bundle")(
        PROMPT, width=WIDTH, height=HEIGHT, latents=z, seed=0, output_type="np"))[None]
    err = float(np.abs(got - want).max())
    assert err <= 2 / 255, f"Turbo-style 1 step: {err * 255:.2f}/255"


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A small AutoencoderTiny (TAESD's architecture, fewer channels), from a fixed seed."""
    import torch
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    vae = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16),
                          decoder_block_out_channels=(16, 16, 16, 16),
                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
                          scaling_factor=0.5)  # TAESD's is 1.0: 0.5 shows it is applied
    out = tmp_path_factory.mktemp("taesd")
    vae.save_pretrained(out, safe_serialization=True)
    return out


def test_tiny_decoder_matches_diffusers_autoencoder_tiny(models, tiny_vae, tmp_path):
    """`--tiny-vae`: the bundle decodes with it on request (`decoder="tiny"`), as diffusers
    does with `pipe.vae = AutoencoderTiny(...)`, and "auto" picks it in low memory."""
    import diffusers
    import torch
    from converters.convert import convert
    convert(models.checkpoint("tiny-sd1"), tmp_path / "b", tiny_vae=tiny_vae)
    m = Manifest.load(tmp_path / "b")
    assert m.vae.tiny_scaling_factor == 0.5 and "vae_decoder_tiny" in m.components
    z = np.random.default_rng(23).standard_normal(SHAPE).astype(np.float32)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(
        models.checkpoint("tiny-sd1"), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    ref.vae = diffusers.AutoencoderTiny.from_pretrained(tiny_vae)
    ref.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = ref(PROMPT, num_inference_steps=3, guidance_scale=7.5, height=HEIGHT,
                   width=WIDTH, latents=torch.from_numpy(z.copy()), output_type="np").images
    pipe = Pipeline.load(tmp_path / "b")
    kw = dict(steps=3, guidance_scale=7.5, width=WIDTH, height=HEIGHT, latents=z,
              scheduler="pndm", output_type="np")
    got = np.asarray(pipe(PROMPT, decoder="tiny", **kw))[None]
    err = float(np.abs(got - want).max())
    assert err <= 2 / 255, f"tiny decoder: {err * 255:.2f}/255"
    full = np.asarray(pipe(PROMPT, **kw))[None]
    assert np.abs(full - got).max() > 0.05  # the default is the full decoder
    result = pipe(PROMPT, decoder="auto", return_dict=True, **kw)  # fast mode: full
    assert result.config.decoder == "full" and np.array_equal(np.asarray(result.images[0]),
                                                              full[0])
    low = Pipeline.load(tmp_path / "b", memory="low")
    result = low(PROMPT, decoder="auto", return_dict=True, **kw)
    assert result.config.decoder == "tiny"  # recorded as what ran
    assert np.abs(np.asarray(result.images[0])[None] - got).max() <= 2 / 255
    with pytest.raises(InvalidInputError, match="no tiny decoder.*--tiny-vae"):
        Pipeline.load(models.bundle("tiny-sd1"))(PROMPT, decoder="tiny", steps=1)
