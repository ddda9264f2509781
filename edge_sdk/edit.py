"""img2img and inpainting: a source image (and mask) turned into where denoising starts, as
diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline do it.

`prepare_edit` reads and checks the inputs before any work (`EditInputs`); `start_edit` then
encodes them, noises the image's latents to the step `strength` selects and returns the
scheduler's start, the inpainting UNet's extra input channels and, for an ordinary UNet asked
to inpaint, the blend that puts the known region back after every step. Array work only: the
encoder is a callable, so the latent side is tested with fakes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import names as N
from .config import MAX_SIDE
from .errors import InvalidInputError
from .image import to_pil
from .image_input import (SourceImage, crop_region, default_size, image_array, mask_array,
                          overlay, read_image, read_mask, resize)
from .manifest import Manifest
from .schedulers import Scheduler

__all__ = ["EditInputs", "EditStart", "prepare_edit", "start_edit", "start_index", "edit_kind",
           "finish_images", "source_size",
           "is_inpainting_unet", "mask_latents"]


# encode(images [1, H, W, 3] in [0, 1]) -> (mean, logvar), the VAE's own latent space
Encode = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray]"]
# after_step(i, latents) -> latents (run after the scheduler's step i)
AfterStep = Callable[[int, np.ndarray], np.ndarray]


def is_inpainting_unet(manifest: Manifest) -> bool:
    """A UNet taking latents + mask + masked-image latents (9 channels for SD)."""
    return manifest.unet.in_channels == 2 * manifest.vae.latent_channels + 1


def edit_kind(manifest: Manifest, image: Any, mask_image: Any) -> str | None:
    """"img2img", "inpaint" or None (text-to-image), refusing what this bundle cannot do."""
    inpainting_unet = is_inpainting_unet(manifest)
    channels = manifest.unet.in_channels
    if image is None:
        if mask_image is not None:
            raise InvalidInputError("mask_image was given without image; give the image to "
                                    "repaint too")
        if inpainting_unet:
            raise InvalidInputError(f"this bundle's UNet is an inpainting one ({channels} "
                                    "input channels): give image= and mask_image= (--image, "
                                    "--mask)")
        return None
    if manifest.unet.time_cond_proj_dim:
        raise InvalidInputError("img2img and inpainting with an LCM-distilled UNet are not "
                                "supported yet (diffusers' LCM img2img pipeline picks its own "
                                "timesteps for the strength)")
    if N.VAE_ENCODER not in manifest.components:
        raise InvalidInputError("this bundle has no VAE encoder (it was converted with "
                                "--no-vae-encoder), so it cannot read an image; "
                                f"{N.RECONVERT_HINT} (without --no-vae-encoder)")
    if mask_image is None and inpainting_unet:
        raise InvalidInputError(f"this bundle's UNet is an inpainting one ({channels} input "
                                "channels): it needs mask_image= (--mask) with the image")
    return "img2img" if mask_image is None else "inpaint"


def finish_images(images: list[Any], edit: "EditInputs | None", paste_back: bool | None
                  ) -> list[Any]:
    """Decoded images (PIL, or float arrays [H, W, 3]) put back into the source image
    (padding_mask_crop) and/or with its pixels outside the mask (paste_back)."""
    if edit is None or not (paste_back or edit.crop is not None):
        return images
    out = [edit.finish(im if isinstance(im, Image.Image) else to_pil(im[None])[0],
                       bool(paste_back)) for im in images]
    return out if isinstance(images[0], Image.Image) else \
        [np.asarray(im, dtype=np.float32) / 255 for im in out]


@dataclass(frozen=True)
class EditInputs:
    """A checked img2img or inpainting request, preprocessed at the output size."""

    image: np.ndarray  # [1, H, W, 3] float32 in [0, 1]
    mask: np.ndarray | None  # [1, 1, H, W], 1 = repaint; None: img2img
    source: SourceImage  # as read (for pasting back and the metadata)
    mask_source: SourceImage | None
    crop: tuple[int, int, int, int] | None  # padding_mask_crop's box in the source image
    resized: Image.Image | None = None  # the image and mask at the output size (no crop)
    resized_mask: Image.Image | None = None

    def finish(self, generated: Image.Image, paste_back: bool) -> Image.Image:
        """A generated image as the caller gets it: put back into the source image's crop
        box (padding_mask_crop) and/or with the source's pixels outside the mask."""
        if self.mask_source is None or not (paste_back or self.crop is not None):
            return generated
        if self.crop is None:  # the source as it was encoded: resized to the output
            assert self.resized is not None and self.resized_mask is not None
            return overlay(self.resized_mask, self.resized, generated)
        if paste_back:  # diffusers' apply_overlay
            return overlay(self.mask_source.image, self.source.image, generated, self.crop)
        x, y, x2, y2 = self.crop  # the repainted box replaces the source's, mask or not
        out = self.source.image.copy()
        out.paste(resize(generated, x2 - x, y2 - y, mode="crop"), (x, y))
        return out

    def parameters(self) -> dict[str, Any]:
        out: dict[str, Any] = {"image_sha256": self.source.sha256}
        if self.mask_source is not None:
            out["mask_sha256"] = self.mask_source.sha256
        return out


def source_size(image: Any, mask: Any, padding_mask_crop: Any, manifest: Manifest,
                multiple: int, width: int | None = None, height: int | None = None
                ) -> tuple[SourceImage, SourceImage | None, tuple[Any, Any]]:
    """The image and mask read and checked, and the output size: `width`/`height` where
    given, otherwise the image's, rounded down to `multiple`; with padding_mask_crop the
    model's own (as diffusers)."""
    src = read_image(image)
    msk = None if mask is None else read_mask(mask)
    if msk is not None and msk.image.size != src.image.size:
        raise InvalidInputError(f"image is {src.image.width}x{src.image.height} but "
                                f"mask_image is {msk.image.width}x{msk.image.height}; give a "
                                "mask of the image's size")
    if padding_mask_crop is not None:
        return src, msk, (manifest.defaults.width if width is None else width,
                          manifest.defaults.height if height is None else height)
    if width is not None and height is not None:  # the image is resized to them
        return src, msk, (width, height)
    w, h = default_size(src.image, multiple)
    if (width is None and w > MAX_SIDE) or (height is None and h > MAX_SIDE):
        raise InvalidInputError(f"the image is {src.image.width}x{src.image.height}, larger "
                                f"than {MAX_SIDE} pixels a side; give width= and height= "
                                "(--width/--height) to work at a smaller size")
    return src, msk, (w if width is None else width, h if height is None else height)


def prepare_edit(src: SourceImage, msk: SourceImage | None, width: int, height: int,
                 padding_mask_crop: int | None) -> EditInputs:
    """The image (and mask) resized to width x height, as diffusers preprocesses them."""
    crop, mode, image = None, "default", src.image
    mask_img = msk.image if msk is not None else None
    if padding_mask_crop is not None:
        if mask_img is None:
            raise InvalidInputError("padding_mask_crop is for inpainting: give mask_image")
        crop, mode = crop_region(mask_img, width, height, int(padding_mask_crop)), "fill"
        image, mask_img = image.crop(crop), mask_img.crop(crop)
    resized = resize(image, width, height, mode)
    resized_mask = None if mask_img is None else resize(mask_img, width, height, mode)
    mask = None if resized_mask is None else mask_array(resized_mask)
    return EditInputs(image_array(resized), mask, src, msk, crop, resized, resized_mask)


def start_index(steps: int, strength: float) -> int:
    """The scheduler step img2img starts at: the last int(steps * strength) steps run
    (diffusers' get_timesteps). No step at all is an error naming the fix."""
    run = min(int(steps * strength), steps)
    if run < 1:
        raise InvalidInputError(f"strength {strength} of {steps} steps runs no step "
                                f"(int({steps} x {strength}) = 0); raise strength to at least "
                                f"{1 / steps:.3g} or use more steps")
    return steps - run


def mask_latents(mask: np.ndarray, factor: int) -> np.ndarray:
    """The pixel mask [B, 1, H, W] at latent size, nearest (torch's F.interpolate picks
    pixel factor * i)."""
    return np.ascontiguousarray(mask[:, :, ::factor, ::factor])


def latents_from_moments(mean: np.ndarray, logvar: np.ndarray, scaling: Callable[
        [np.ndarray], np.ndarray], rng: np.random.Generator | None) -> np.ndarray:
    """DiagonalGaussianDistribution: its mean, or mean + std * N(0, 1) drawn from `rng`;
    in diffusion space (`scaling`)."""
    z = mean
    if rng is not None:
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))
        z = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return scaling(z.astype(np.float32))


@dataclass
class EditStart:
    """Where denoising starts: the latents at the first step run, the UNet's extra input
    channels (inpainting UNets) and the step-end blend (ordinary UNets inpainting)."""

    latents: np.ndarray
    channels: np.ndarray | None = None
    after_step: AfterStep | None = None


def start_edit(edit: EditInputs, sched: Scheduler, noise: np.ndarray, strength: float,
               encode: Encode, scaling: Callable[[np.ndarray], np.ndarray],
               rngs: Sequence[np.random.Generator], sample: bool, inpaint_unet: bool,
               factor: int) -> EditStart:
    """Encode the inputs, set the scheduler's begin index for `strength` and noise the
    image's latents there. `noise` [B, C, h, w] is the initial noise; with `sample`, image
    k's latents are drawn from the encoder's distribution with rngs[k] (its own generator,
    after its noise), otherwise they are the distribution's mean."""
    begin = start_index(sched.num_inference_steps, strength)
    sched.set_begin_index(begin)
    batch = noise.shape[0]
    pick = (lambda k: rngs[k]) if sample else (lambda k: None)  # one generator per image
    full = edit.mask is None or not inpaint_unet or strength < 1.0
    image_lat = None
    if full:
        mean, logvar = encode(edit.image)
        image_lat = np.concatenate([latents_from_moments(mean, logvar, scaling, pick(k))
                                    for k in range(batch)])
    if edit.mask is not None and strength >= 1.0:  # diffusers: pure noise at full strength
        latents = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
    else:
        assert image_lat is not None
        latents = sched.add_noise(image_lat, noise, begin)
    if edit.mask is None:
        return EditStart(latents)
    mask = np.repeat(mask_latents(edit.mask, factor), batch, axis=0)
    if inpaint_unet:
        masked = np.where(edit.mask >= 0.5, np.float32(0.5), edit.image.transpose(0, 3, 1, 2))
        mean, logvar = encode(masked.transpose(0, 2, 3, 1))
        masked_lat = np.concatenate([latents_from_moments(mean, logvar, scaling, pick(k))
                                     for k in range(batch)])
        return EditStart(latents, np.concatenate([mask, masked_lat], axis=1))
    assert image_lat is not None
    return EditStart(latents, None, known_region_blend(sched, image_lat, noise, mask))


def known_region_blend(sched: Scheduler, image_latents: np.ndarray, noise: np.ndarray,
                       mask: np.ndarray) -> AfterStep:
    """After step i, the region outside the mask is the image's latents noised to the next
    step's level (un-noised after the last): an ordinary UNet inpaints this way."""
    last = len(sched.timesteps) - 1

    def blend(i: int, latents: np.ndarray) -> np.ndarray:
        known = sched.add_noise(image_latents, noise, i + 1) if i < last else image_latents
        return ((1 - mask) * known + mask * latents).astype(np.float32)
    return blend
