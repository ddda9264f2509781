"""Live previews: a cheap picture of the latents every few steps.

A bundle's manifest holds a linear latent-to-RGB map fitted against its VAE at conversion
(converters.preview_fit): one small matrix product per preview, a fraction of a percent of a
UNet step. Where the bundle has a tiny decoder it draws the preview instead in memory mode
"fast": sharper, still a small fraction of the full decoder, but its session and its
activations at full resolution would sit beside the UNet's, which the other modes' plans do
not count; they use the map unless the caller asks for the tiny decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from PIL import Image

from . import names as N
from .backends import Session
from .errors import CallbackError, InvalidInputError
from .image import to_pil
from .manifest import Manifest
from .vae import decode_latents_tiny

__all__ = ["Preview", "PreviewFn", "PREVIEW_SOURCES", "latent_rgb_image", "preview_source",
           "preview_maker", "as_preview", "preview_hook"]

# preview(step, image): step counts from 0, image is a PIL RGB image of the first image
PreviewFn = Callable[[int, Image.Image], Any]


def latent_rgb_image(latents: np.ndarray, latent_rgb: Any, factor: int) -> Image.Image:
    """latents [C, h, w] (diffusion space) -> an RGB image of h*factor x w*factor."""
    w = np.asarray(latent_rgb, dtype=np.float32)
    c, h, wd = latents.shape
    rgb = latents.reshape(c, -1).T @ w[:-1] + w[-1]
    pixels = (np.clip(rgb, 0, 1).reshape(h, wd, 3) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((wd * factor, h * factor),
                                                 Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class Preview:
    """Live previews: `fn(step, image)` every `every` steps and at the last, drawn by
    `source`: "auto" (the tiny decoder in memory mode fast where the bundle has one, else
    the map), "map" (the cheapest) or "tiny" (the sharpest; outside mode fast its memory is
    not in the plan). `fn`'s return value is ignored (cancel from the step callback).
    `pipe(..., preview=fn, preview_every=N)` is `Preview(fn, N)`."""

    fn: PreviewFn
    every: int = 1
    source: str = "auto"


PREVIEW_SOURCES = ("auto", "map", "tiny")


def preview_source(manifest: Manifest, mode: str, asked: str = "auto") -> str:
    """What draws the previews in memory mode `mode`: "tiny" (the tiny decoder) or "map"."""
    if asked != "auto":
        return asked
    return "tiny" if manifest.vae.tiny_scaling_factor and mode == "fast" else "map"


def preview_maker(manifest: Manifest, mode: str, session: Callable[[str], Session],
                  asked: str = "auto") -> Callable[[np.ndarray], Image.Image]:
    """latents [B, C, h, w] (diffusion space) -> a PIL picture of the first image."""
    vae = manifest.vae
    if preview_source(manifest, mode, asked) == "tiny":
        return lambda z: to_pil(decode_latents_tiny(session(N.VAE_DECODER_TINY), z[:1],
                                                    vae.tiny_scaling_factor))[0]
    return lambda z: latent_rgb_image(z[0], vae.latent_rgb, vae.scale_factor)


def as_preview(preview: Any, every: Any, manifest: Manifest, mode: str) -> Preview | None:
    """`preview` (a callable or a Preview) and `preview_every`, checked before any work, for
    memory mode `mode`."""
    if preview is None:
        return None
    if not isinstance(preview, Preview):
        preview = Preview(preview, every)
    if not callable(preview.fn):
        raise InvalidInputError(f"preview must be callable as preview(step, image), got "
                                f"{preview.fn!r}")
    if isinstance(preview.every, bool) or not isinstance(preview.every, int) \
            or preview.every < 1:
        raise InvalidInputError(f"preview_every must be a whole number of steps >= 1, got "
                                f"{preview.every!r}")
    if preview.source not in PREVIEW_SOURCES:
        raise InvalidInputError(f"preview source must be one of {PREVIEW_SOURCES}, got "
                                f"{preview.source!r}")
    vae, source = manifest.vae, preview_source(manifest, mode, preview.source)
    if source == "tiny" and not vae.tiny_scaling_factor:
        raise InvalidInputError("previews from the tiny decoder: this bundle has none; add one "
                                "with `edge-convert ... --tiny-vae FOLDER`, or use source "
                                "'map'")
    if source == "map" and not vae.latent_rgb:
        raise InvalidInputError("this bundle has no preview map (converted before previews "
                                "existed); re-convert it" + (
                                    ", or ask for the tiny decoder's: Preview(fn, every, "
                                    "'tiny')" if vae.tiny_scaling_factor else ""))
    return preview


def preview_hook(fn: PreviewFn, every: int, make: Callable[[np.ndarray], Image.Image]
                 ) -> Callable[[int, int, np.ndarray], None]:
    """The denoising loop's observer (run_denoising's `observe`): fn(step, make(latents))
    every `every` steps and at the last, on each step's final latents. A failure of `fn` is
    the caller's (a CallbackError); one of `make` is ours and propagates as it is."""
    def hook(i: int, total: int, latents: np.ndarray) -> None:
        if (i + 1) % every and i + 1 != total:
            return
        image = make(latents)
        try:
            fn(i, image)
        except Exception as exc:  # the caller's code: say whose failure it was
            raise CallbackError(f"the preview callback raised {type(exc).__name__}: "
                                f"{exc} (at step {i + 1}/{total}); the generation was "
                                "stopped") from exc
    return hook
