"""The array side of img2img and inpainting, against diffusers' own helpers and with fakes:
crop boxes, resizing, mask downsampling, the strength -> first step rule, sampling the
encoder's distribution, the known-region blend, EXIF orientation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edge_sdk.edit import known_region_blend, latents_from_moments, mask_latents, start_index
from edge_sdk.errors import InvalidInputError
from edge_sdk.image_input import crop_region, read_image, resize
from edge_sdk.schedulers import create_scheduler

from .conftest import needs_convert

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def _masks(n: int = 40):
    rng = np.random.default_rng(5)
    for _ in range(n):
        h, w = rng.integers(20, 90, 2)
        m = np.zeros((h, w), np.uint8)
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        m[y0:rng.integers(y0 + 1, h), x0:rng.integers(x0 + 1, w)] = 255
        yield Image.fromarray(m), int(rng.integers(0, 12)), *(int(v) * 8 for v in
                                                             rng.integers(4, 12, 2))


@needs_convert
def test_crop_region_and_resizes_are_diffusers():
    from diffusers.image_processor import VaeImageProcessor
    proc = VaeImageProcessor(vae_scale_factor=8)
    for mask, pad, width, height in _masks():
        box = crop_region(mask, width, height, pad)
        assert box == VaeImageProcessor.get_crop_region(mask, width, height, pad=pad)
        img = mask.convert("RGB").crop(box)
        for mode in ("default", "fill", "crop"):
            ours = np.asarray(resize(img, width, height, mode))
            assert np.array_equal(ours, np.asarray(proc.resize(img, height, width, mode))), mode


@needs_convert
def test_mask_latents_pick_pixels_as_torch_nearest_interpolation():
    import torch
    m = (np.random.default_rng(1).random((2, 1, 72, 104)) > 0.5).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(m), size=(9, 13)).numpy()
    assert np.array_equal(mask_latents(m, 8), want)


@pytest.mark.parametrize("steps,strength,begin", [(10, 0.3, 7), (10, 1.0, 0), (8, 0.75, 2),
                                                  (20, 0.05, 19), (3, 0.5, 2)])
def test_strength_selects_the_first_step_as_diffusers_get_timesteps(steps, strength, begin):
    assert start_index(steps, strength) == begin


def test_a_strength_that_runs_no_step_is_refused():
    with pytest.raises(InvalidInputError, match="runs no step.*at least 0.1"):
        start_index(10, 0.09)


def test_sampling_the_latent_distribution_uses_the_generator_and_the_clamped_logvar():
    mean = np.full((1, 4, 30, 30), 2.0, np.float32)
    logvar = np.full_like(mean, 50.0)  # clamped to 20, as diffusers does
    ident = lambda z: z  # noqa: E731
    assert np.array_equal(latents_from_moments(mean, logvar, ident, None), mean)
    a = latents_from_moments(mean, np.full_like(mean, np.log(0.25)), ident,
                             np.random.default_rng(3))
    assert np.array_equal(a, latents_from_moments(mean, np.full_like(mean, np.log(0.25)), ident,
                                                  np.random.default_rng(3)))
    assert abs(float(a.mean()) - 2.0) < 0.05 and abs(float(a.std()) - 0.5) < 0.05
    wide = latents_from_moments(mean, logvar, ident, np.random.default_rng(3))
    assert abs(float(wide.std()) / np.exp(10) - 1) < 0.05


def test_the_blend_keeps_the_known_region_at_the_next_steps_noise_level():
    sched = create_scheduler("euler", SD_SCHEDULER, 6)
    sched.set_begin_index(2)
    known = np.full((1, 4, 4, 4), 1.0, np.float32)
    noise = np.random.default_rng(0).standard_normal(known.shape).astype(np.float32)
    mask = np.zeros((1, 1, 4, 4), np.float32)
    mask[..., :2] = 1  # repaint the left half
    blend = known_region_blend(sched, known, noise, mask)
    latents = np.full_like(known, 7.0)
    mid = blend(3, latents)
    assert np.all(mid[..., :2] == 7.0)
    assert np.allclose(mid[..., 2:], (known + noise * sched.sigmas[4])[..., 2:])
    assert np.array_equal(blend(len(sched.timesteps) - 1, latents)[..., 2:], known[..., 2:])


def test_a_photo_is_read_upright_with_its_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    img.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    src = read_image(tmp_path / "photo.jpg")
    assert src.image.size == (20, 40)
    top = np.asarray(src.image)[:5].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the blue edge is now at the top
