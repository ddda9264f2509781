"""img2img and inpainting reproduce diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on tiny checkpoints, at 104x72: a multiple of 8 that is not a
multiple of the tiny UNet's downsampling (16 px), so text-to-image there is checked too.

The same initial noise on both sides: ours is `latents=`, diffusers' `randn_tensor` in the
img2img pipeline is patched to return it (its inpainting pipeline takes `latents=`). The
encoder's latent distribution is read at its mean on both sides (`encode_mode="mean"`;
diffusers' `DiagonalGaussianDistribution.sample` patched to return the mean).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from edge_sdk import Pipeline

from .conftest import needs_convert

pytestmark = needs_convert

PROMPT = "a red circle on a blue background"
WIDTH, HEIGHT = 104, 72  # 13 x 9 latents
STEPS, GUIDANCE = 8, 7.5
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "dpmpp_2m": "DPMSolverMultistepScheduler"}
TOLERANCE = 2 / 255


def scene() -> Image.Image:
    """A source image with edges and gradients (fixed)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([x * 2.4, y * 3.5, 255 - x * 2], axis=-1).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((10, 12, 50, 52), fill=(220, 30, 40))
    draw.rectangle((60, 20, 95, 60), fill=(240, 240, 30))
    return img


def mask() -> Image.Image:
    """White = repaint: a box whose edges are not on the 8-pixel latent grid."""
    m = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(m).rectangle((53, 13, 98, 61), fill=255)
    return m


def noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(
        (1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


@pytest.fixture
def mean_latents(monkeypatch):
    """diffusers reads the encoder's distribution at its mean, as encode_mode="mean"."""
    from diffusers.models.autoencoders import vae
    monkeypatch.setattr(vae.DiagonalGaussianDistribution, "sample",
                        lambda self, generator=None: self.mean)


def _load(kind: str, checkpoint, scheduler: str | None = None):
    import diffusers
    cls = {"img2img": diffusers.StableDiffusionImg2ImgPipeline,
           "inpaint": diffusers.StableDiffusionInpaintPipeline,
           "txt2img": diffusers.StableDiffusionPipeline}[kind]
    pipe = cls.from_pretrained(checkpoint, local_files_only=True, safety_checker=None,
                               requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(
            pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe, **kwargs) -> np.ndarray:
    import torch
    with torch.no_grad():
        return pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    height=HEIGHT, width=WIDTH, output_type="np", **kwargs).images


def _ours(bundle, scheduler: str | None, **kwargs) -> np.ndarray:
    pipe = Pipeline.load(bundle)
    out = pipe(PROMPT, steps=STEPS, guidance_scale=GUIDANCE, width=WIDTH, height=HEIGHT,
               scheduler=scheduler, output_type="np", **kwargs)
    return np.asarray(out)[None]


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape == (1, HEIGHT, WIDTH, 3)
    err = float(np.abs(got - want).max())
    assert err <= TOLERANCE, f"{what}: max abs diff {err * 255:.2f}/255"


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
def test_img2img_matches_diffusers(models, scheduler, strength, mean_latents, monkeypatch):
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod
    import torch
    z = noise(11)
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: torch.from_numpy(z.copy()))
    want = _run(_load("img2img", models.checkpoint("tiny-sd1"), scheduler), image=scene(),
                strength=strength)
    got = _ours(models.bundle("tiny-sd1"), scheduler, image=scene(), strength=strength,
                latents=z, encode_mode="mean")
    _close(got, want, f"img2img {scheduler} strength {strength}")
    # and the source mattered: at strength 0.3 the result is near the image, not noise
    if strength == 0.3:
        src = np.asarray(scene(), dtype=np.float32)[None] / 255
        assert np.abs(got - src).mean() < np.abs(_ours(
            models.bundle("tiny-sd1"), scheduler, latents=z) - src).mean()


@pytest.mark.parametrize("arch", ["tiny-inpaint", "tiny-sd1"])
def test_inpainting_matches_diffusers(models, arch, mean_latents):
    """9 input channels (latents + mask + masked-image latents), and a 4-channel UNet whose
    known region is blended back after every step."""
    import torch
    z = noise(12)
    want = _run(_load("inpaint", models.checkpoint(arch), "euler"), image=scene(),
                mask_image=mask(), latents=torch.from_numpy(z.copy()))
    got = _ours(models.bundle(arch), "euler", image=scene(), mask_image=mask(), latents=z,
                encode_mode="mean")
    _close(got, want, f"inpainting {arch}")


def test_text_to_image_at_104x72_matches_diffusers(models):
    import torch
    z = noise(13)
    want = _run(_load("txt2img", models.checkpoint("tiny-sd1"), "euler"),
                latents=torch.from_numpy(z.copy()))
    _close(_ours(models.bundle("tiny-sd1"), "euler", latents=z), want, "text-to-image")


def test_pndm_img2img_matches_diffusers(models, mean_latents, monkeypatch):
    """PNDM (its first step re-evaluated) starting part-way: diffusers slices its timesteps."""
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod
    import diffusers
    import torch
    z = noise(14)
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: torch.from_numpy(z.copy()))
    ref = _load("img2img", models.checkpoint("tiny-sd1"))
    ref.scheduler = diffusers.PNDMScheduler.from_config(ref.scheduler.config)
    want = _run(ref, image=scene(), strength=0.75)
    got = _ours(models.bundle("tiny-sd1"), "pndm", image=scene(), strength=0.75, latents=z,
                encode_mode="mean")
    _close(got, want, "img2img pndm strength 0.75")


@pytest.mark.parametrize("scheduler", ["euler_a", "lcm", "dpmpp_2m_karras"])
def test_every_scheduler_edits(models, scheduler):
    """The stochastic ones draw from numpy, so they cannot match diffusers' torch draws:
    they must run, repeat with the seed, and at strength 0.3 stay nearer the source than a
    text-to-image generation does."""
    src = np.asarray(scene(), dtype=np.float32)[None] / 255
    kw = dict(image=scene(), strength=0.3, seed=5)
    a = _ours(models.bundle("tiny-sd1"), scheduler, **kw)
    assert np.array_equal(a, _ours(models.bundle("tiny-sd1"), scheduler, **kw))
    free = _ours(models.bundle("tiny-sd1"), scheduler, seed=5)
    assert np.abs(a - src).mean() < np.abs(free - src).mean()


def _big() -> tuple[Image.Image, Image.Image]:
    """A 208x150 source and a mask over a small part of it (padding_mask_crop's case)."""
    img = scene().resize((208, 150), Image.Resampling.LANCZOS)
    m = Image.new("L", img.size, 0)
    ImageDraw.Draw(m).ellipse((120, 40, 150, 70), fill=255)
    return img, m


def test_padding_mask_crop_matches_diffusers(models, mean_latents):
    """Only the box around the mask is repainted, at the asked size, and pasted back into
    the full source through the mask (diffusers' apply_overlay)."""
    import torch
    img, m = _big()
    z = noise(15)
    import diffusers  # noqa: F401  (diffusers' overlay needs PIL output)
    with torch.no_grad():
        want = _load("inpaint", models.checkpoint("tiny-sd1"), "euler")(
            PROMPT, image=img, mask_image=m, latents=torch.from_numpy(z.copy()),
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH,
            padding_mask_crop=6).images[0]
    pipe = Pipeline.load(models.bundle("tiny-sd1"))
    got = pipe(PROMPT, image=img, mask_image=m, latents=z, encode_mode="mean", steps=STEPS,
               guidance_scale=GUIDANCE, width=WIDTH, height=HEIGHT, scheduler="euler",
               padding_mask_crop=6)
    assert got.size == want.size == img.size
    diff = np.abs(np.asarray(got, np.int16) - np.asarray(want, np.int16))
    assert diff.max() <= 2, f"max diff {diff.max()}/255"
    # outside the mask: the source itself; the repainted box differs from it
    src, out = np.asarray(img, np.int16), np.asarray(got, np.int16)
    outside = np.asarray(m) == 0
    assert np.array_equal(out[outside], src[outside]) and np.abs(out - src).max() > 30
    # paste_back=False: the whole repainted box replaces the source's, nothing else changes
    whole = np.asarray(pipe(PROMPT, image=img, mask_image=m, latents=z, encode_mode="mean",
                            steps=STEPS, width=WIDTH, height=HEIGHT, scheduler="euler",
                            padding_mask_crop=6, paste_back=False), np.int16)
    from edge_sdk.image_input import crop_region
    x1, y1, x2, y2 = crop_region(m, WIDTH, HEIGHT, 6)
    box = np.zeros(outside.shape, bool)
    box[y1:y2, x1:x2] = True
    assert np.array_equal(whole[~box], src[~box]) and not np.array_equal(whole[box], src[box])
