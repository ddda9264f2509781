"""Live previews: called every N steps and at the last, drawn at latent resolution by the
bundle's preview decoder (the default model's: the last a fair picture of the image) or its
linear latent-to-RGB map, or by the tiny decoder on request."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from edge_sdk import CallbackError, CancelledError, InvalidInputError, Pipeline, Preview
from edge_sdk import names as N
from edge_sdk.preview import (conv2d, latent_rgb_image, preview_decoder_image,
                              preview_source)
from tests.bench.preview_quality import psnr  # PSNR after downscaling both to 16x16

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()


def test_the_last_preview_resembles_the_image_and_previews_come_every_n_steps(pipe):
    assert preview_source(pipe.manifest, pipe.plan.mode) == "map"  # its preview decoder
    seen: list[tuple[int, Image.Image]] = []
    for seed, prompt in enumerate((PROMPT, "two small yellow stars at the top on a white "
                                   "background", "a green square on the left on a black "
                                   "background")):
        seen.clear()
        image = pipe(prompt, seed=seed, steps=10,
                     preview=lambda step, im: seen.append((step, im)), preview_every=4)
        assert [s for s, _ in seen] == [3, 7, 9]  # every 4 steps and the last
        assert seen[-1][1].size == image.size
        last = psnr(seen[-1][1], image)
        assert last >= 15, f"seed {seed}: the last preview is {last:.1f} dB from the image"
        assert psnr(seen[0][1], image) < last  # step 4 of 10 is still noisy
    assert N.VAE_DECODER_TINY not in pipe.components.loaded  # the map drew them


def test_the_preview_decoder_is_what_torch_computes(tmp_path):
    """A torch.nn.Sequential of convolutions saved with safetensors, read by the converter,
    run by numpy: the same numbers as torch's, at an odd size."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from converters.preview_fit import read_preview_decoder
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 5, 5, padding=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(5, 3, 1))
    save_file(net.state_dict(), str(tmp_path / "preview_decoder.safetensors"))
    layers = read_preview_decoder(tmp_path, latent_channels=4)  # the folder, or the file
    assert [x.shape for x in layers] == [(6, 4, 3, 3), (5, 6, 5, 5), (3, 5, 1, 1)]
    z = torch.randn(1, 4, 7, 5)
    want = net(z)[0].detach().numpy()
    x = z[0].numpy()
    for i, layer in enumerate(layers):
        x = conv2d(x, np.asarray(layer.weight, np.float32).reshape(layer.shape),
                   np.asarray(layer.bias, np.float32))
        x = np.maximum(x, 0) if i < 2 else x
    assert np.abs(x - want).max() < 1e-5
    img = np.asarray(preview_decoder_image(z[0].numpy(), layers, factor=1))
    assert img.shape == (7, 5, 3)
    assert np.abs(img / 255.0 - np.clip(want.transpose(1, 2, 0), 0, 1)).max() <= 0.5 / 255 + 1e-6


def test_auto_is_the_map_where_there_is_one_else_the_tiny_decoder_in_fast_mode(pipe):
    m = pipe.manifest
    linear_only = replace(m, vae=replace(m.vae, preview_decoder=()))
    no_map = replace(m, vae=replace(m.vae, preview_decoder=(), latent_rgb=()))
    assert [preview_source(x, mode) for x in (m, linear_only) for mode in ("fast", "low")] \
        == ["map"] * 4
    assert preview_source(no_map, "fast") == "tiny"
    assert preview_source(no_map, "low") == "map"  # refused by as_preview, with the fix
    z = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
    from edge_sdk.preview import preview_maker
    linear = preview_maker(linear_only, "fast", pipe.session)(z)
    assert linear == latent_rgb_image(z[0], m.vae.latent_rgb, 8)  # no preview decoder


def test_the_source_can_be_chosen():
    seen: list[Image.Image] = []
    low = Pipeline.load(memory="low")

    def look(step: int, im: Image.Image) -> None:
        assert N.VAE_DECODER_TINY in low.components.loaded  # asked for: drawn by it
        seen.append(im)
    img = low(PROMPT, seed=0, steps=2, preview=Preview(look, 2, "tiny"))
    assert len(seen) == 1 and seen[-1].size == img.size
    assert N.VAE_DECODER_TINY not in low.components.loaded  # released after the steps


def test_previews_follow_the_step_callback(pipe):
    """They show the latents the callback put in place, and none comes after a cancel."""
    seen: list[Image.Image] = []
    pipe(PROMPT, seed=0, steps=2, callback=lambda i, n, z: np.zeros_like(z),
         preview=Preview(lambda s, im: seen.append(im), 1, "map"))
    zeros = np.asarray(preview_decoder_image(np.zeros((4, 16, 16), np.float32),
                                             pipe.manifest.vae.preview_decoder, 8))
    assert (np.asarray(seen[-1]) == zeros).all()  # the zeros, not the model's latents
    seen.clear()
    with pytest.raises(CancelledError):
        pipe(PROMPT, seed=0, steps=3, callback=lambda i, n, z: i < 1,
             preview=Preview(lambda s, im: seen.append(im), 1, "map"))
    assert len(seen) == 1


def test_the_map_is_an_affine_map_per_latent_pixel():
    w = ((0.5, 0.0, 0.0), (0.0, 0.5, 0.0), (0.0, 0.0, 0.5), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5))
    z = np.zeros((4, 2, 3), np.float32)
    z[0, 0, 0], z[1, 1, 2], z[2, 0, 1] = 1.0, -1.0, 0.2  # red up, green down (clipped), blue
    img = np.asarray(latent_rgb_image(z, w, factor=1))
    assert img.shape == (2, 3, 3)
    assert tuple(img[0, 0]) == (255, 128, 128)
    assert tuple(img[1, 2]) == (128, 0, 128)
    assert tuple(img[0, 1]) == (128, 128, 153)


def test_the_default_model_ships_a_fitted_map_and_a_preview_decoder(pipe):
    rows = pipe.manifest.vae.latent_rgb
    assert len(rows) == pipe.manifest.vae.latent_channels + 1
    assert any(abs(x) > 1e-3 for row in rows[:-1] for x in row)  # not an all-bias map
    assert [x.shape[:2] for x in pipe.manifest.vae.preview_decoder] == [(16, 4), (16, 16),
                                                                        (3, 16)]


def test_preview_errors_are_typed(pipe):
    with pytest.raises(InvalidInputError, match="preview must be callable"):
        pipe("x", steps=1, preview="no")
    with pytest.raises(InvalidInputError, match="preview_every must be"):
        pipe("x", steps=1, preview=lambda s, i: None, preview_every=0)
    with pytest.raises(CallbackError, match="^the preview callback raised ValueError"):
        pipe("x", steps=2, preview=lambda s, i: (_ for _ in ()).throw(ValueError("full")))
    assert pipe("x", steps=1, seed=0).size == (128, 128)  # still usable


def test_cli_writes_the_preview_file(tmp_path):
    from edge_sdk.cli import main
    out, prev = tmp_path / "o.png", tmp_path / "p.png"
    assert main(["generate", PROMPT, "--steps", "4", "--seed", "1", "-q", "-o",
                 str(out), "--preview", str(prev), "--preview-every", "2"]) == 0
    with Image.open(prev) as p:
        assert p.size == (128, 128) and p.text["parameters"] == '{"step": 4}'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["o.png", "p.png"]  # no temp left
    assert main(["generate", "x", "--steps", "1", "-q", "-o", str(out),
                 "--preview", str(out)]) == 2
