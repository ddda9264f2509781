"""A real diffusers VAE decoder split into stages (converters.vae_stages) and run tiled by
edge_sdk.tiling gives the untiled decoder's image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk.tiling import Stage, run_stages

from .conftest import needs_convert

pytestmark = needs_convert


def _torch_stage(s):
    import torch

    def run(tiles, mean, inv):
        args = [torch.from_numpy(np.ascontiguousarray(t)) for t in tiles]
        if mean is not None:
            args += [torch.from_numpy(mean), torch.from_numpy(inv)]
        with torch.no_grad():
            return s.module(*args).numpy()
    return Stage(run, s.groups, s.halo, s.scale, s.skips, s.tiled, s.eps, s.down)


@pytest.mark.parametrize("vae_dir", ["tiny", "shapes"])
def test_staged_tiled_decoder_equals_the_decoder(models, vae_dir):
    import torch
    from diffusers import AutoencoderKL

    from converters.vae_stages import decoder_stages
    path = (models.checkpoint("tiny-sd1") / "vae" if vae_dir == "tiny"
            else Path(__file__).parents[1] / "models" / "shapes" / "checkpoint" / "vae")
    vae = AutoencoderKL.from_pretrained(path).float().eval()
    stages = [_torch_stage(s) for s in decoder_stages(vae)]
    assert sum(not s.tiled for s in stages) == 1  # the mid-block attention only
    z = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 4, 10, 14))
                         .astype(np.float32))
    with torch.no_grad():
        reference = vae.decode(z).sample.numpy()
    tiled = run_stages(z.numpy(), stages, tile=3)  # 3 does not divide 10 or 14
    assert tiled.shape == reference.shape
    assert np.abs(tiled - reference).max() < 1e-4


@pytest.mark.parametrize("vae_dir", ["tiny", "shapes"])
def test_staged_tiled_encoder_equals_the_encoder(models, vae_dir):
    """The encoder's stages (stride-2 ones among them) in strips give its latent moments."""
    import torch
    from diffusers import AutoencoderKL

    from converters.vae_stages import encoder_stages
    path = (models.checkpoint("tiny-sd1") / "vae" if vae_dir == "tiny"
            else Path(__file__).parents[1] / "models" / "shapes" / "checkpoint" / "vae")
    vae = AutoencoderKL.from_pretrained(path).float().eval()
    stages = [_torch_stage(s) for s in encoder_stages(vae)]
    assert sum(s.down == 2 for s in stages) == 3 and sum(not s.tiled for s in stages) == 1
    x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (1, 3, 72, 104))
                         .astype(np.float32))
    with torch.no_grad():
        reference = vae.quant_conv(vae.encoder(x)).numpy()
    for tile in (20, 40):  # image pixels: strips of 8 and 16 rows at the first level
        tiled = run_stages(x.numpy(), stages, tile=tile)
        assert tiled.shape == reference.shape
        assert np.abs(tiled - reference).max() < 1e-4


def test_bundle_with_vae_stages_decodes_tiled_exactly_and_low_mode_uses_them(models, tmp_path):
    from converters.convert import convert
    from edge_sdk import GenerationConfig, Manifest, Pipeline
    out = tmp_path / "staged"
    convert(models.checkpoint("tiny-sd1"), out, vae_stages=True)
    m = Manifest.load(out)
    stages = m.vae.decoder_stages
    assert stages and all(s.component in m.components for s in stages)
    assert m.vae.encoder_stages and all(s.component in m.components
                                        for s in m.vae.encoder_stages)
    pipe = Pipeline.load(out)
    latents = pipe.generate("a red circle", GenerationConfig(seed=0, steps=3, width=96,
                                                             height=64)).latents
    whole = pipe.decode_latents(latents, tile=0)
    for tile in (3, 5):  # latent pixels; neither divides 12 x 8
        assert np.abs(pipe.decode_latents(latents, tile=tile) - whole).max() < 1e-5
    low = Pipeline.load(out, memory="low")
    img_low = np.asarray(low("a red circle", seed=0, steps=3, width=96, height=64), np.int16)
    img_fast = np.asarray(pipe("a red circle", seed=0, steps=3, width=96, height=64), np.int16)
    assert np.abs(img_low - img_fast).max() <= 1 and not low.components.loaded
    # balanced keeps its components, but not the stages (each holds an arena while it runs)
    balanced = Pipeline.load(out, memory="balanced")
    balanced("a red circle", seed=0, steps=3, width=96, height=64)
    kept = set(balanced.components.loaded)
    assert "unet" in kept and not {s.component for s in stages} & kept
    # the encoder in tiles: the same moments, and low mode's img2img the same image
    image = np.random.default_rng(2).random((1, 64, 96, 3)).astype(np.float32)
    mean, logvar = pipe.encode_image(image, tile=0)
    for tile in (1, 3):
        m2, l2 = pipe.encode_image(image, tile=tile)
        assert np.abs(m2 - mean).max() < 1e-5 and np.abs(l2 - logvar).max() < 1e-5
    src = (image[0] * 255).astype(np.uint8)
    a = np.asarray(low("a red circle", image=src, seed=0, steps=3), np.int16)
    b = np.asarray(pipe("a red circle", image=src, seed=0, steps=3), np.int16)
    assert np.abs(a - b).max() <= 1 and not low.components.loaded
