"""Textual-inversion embeddings added at conversion (edge-convert --embedding): the image
matches diffusers' load_textual_inversion for an A1111 multi-vector file and a diffusers
single-vector one; prompts without the token are unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_sdk import GenerationConfig, Pipeline

from .conftest import needs_convert

pytestmark = needs_convert

WIDTH, HEIGHT, STEPS, GUIDANCE = 96, 64, 5, 7.5
LEAN = dict(vae_encoder=False, vae_stages=False, feature_cache=False)


def _latents() -> np.ndarray:
    return np.random.default_rng(9).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)
                                                    ).astype(np.float32)


def _ours(bundle, prompt) -> np.ndarray:
    pipe = Pipeline.load(bundle)
    result = pipe.generate(prompt, GenerationConfig(steps=STEPS, guidance_scale=GUIDANCE,
                                                    width=WIDTH, height=HEIGHT,
                                                    scheduler="ddim"), latents=_latents())
    return pipe.decode_latents(result.latents)


def _diffusers(ckpt, files, prompt) -> np.ndarray:
    import diffusers
    import torch
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        ckpt, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for path, token in files:
        pipe.load_textual_inversion(str(path), token=token)
    with torch.no_grad():
        return pipe(prompt, latents=torch.from_numpy(_latents()), num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH,
                    output_type="np").images


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """An A1111 file of 3 vectors (trigger: its name) and a diffusers one of 1 vector."""
    from safetensors.numpy import save_file
    width = json.loads((models.checkpoint("tiny-sd1") / "text_encoder" / "config.json"
                        ).read_text())["hidden_size"]
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("embeddings")
    a1111, diff = folder / "glowstyle.safetensors", folder / "learned_embeds.safetensors"
    save_file({"emb_params": rng.standard_normal((3, width)).astype(np.float32)}, str(a1111))
    save_file({"shinytok": rng.standard_normal((width,)).astype(np.float32)}, str(diff))
    return [(a1111, "glowstyle"), (diff, "shinytok")]


def test_embeddings_match_diffusers(models, files):
    ckpt = models.checkpoint("tiny-sd1")
    bundle = models.bundle("tiny-sd1", embeddings=tuple(str(p) for p, _ in files), **LEAN)
    for prompt in ("a red circle in glowstyle, shinytok", "a red circle in GlowStyle"):
        got, want = _ours(bundle, prompt), _diffusers(ckpt, files, prompt.lower())
        err = float(np.abs(got - want).max())
        assert err <= 2 / 255, f"{prompt!r}: {err * 255:.2f}/255 from diffusers"
    plain = "a red circle on a blue background"
    assert np.array_equal(_ours(bundle, plain), _ours(models.bundle("tiny-sd1", **LEAN), plain))
    tok = Pipeline.load(bundle).tokenizer
    assert tok.expand("in GlowStyle") == "in glowstyle glowstyle_1 glowstyle_2"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert [(e["token"], e["vectors"]) for e in manifest["converter"]["embeddings"]] == \
        [("glowstyle", 3), ("shinytok", 1)]
