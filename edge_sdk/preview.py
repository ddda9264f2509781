"""Live previews: a cheap picture of the latents every few steps.

The "map" draws them at latent resolution from the manifest alone: a bundle's preview
decoder where it has one (a few small convolutions trained for the model, given at
conversion: `edge-convert --preview-decoder`; 0.04 % of an SD 1.5 step), else the linear
latent-to-RGB map fitted against its VAE at conversion (converters.preview_fit; one small
matrix product). A linear map is only as good as the VAE's latent space is linear in colour:
fair for SD's VAE, poor for the default model's small one, whose trained preview decoder is
what makes its previews resemble the image. The tiny decoder draws them on request: sharper,
but about 8 % of an SD 1.5 step, and outside memory mode "fast" its session and activations
are not in the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import names as N
from .backends import Session
from .errors import CallbackError, InvalidInputError
from .image import to_pil
from .manifest import Manifest, PreviewLayer
from .vae import decode_latents_tiny

__all__ = ["Preview", "PreviewFn", "PREVIEW_SOURCES", "latent_rgb_image",
           "preview_decoder_image", "preview_decoder_arrays", "conv2d", "preview_source",
           "preview_maker", "as_preview", "preview_hook"]

# preview(step, image): step counts from 0, image is a PIL RGB image of the first image
PreviewFn = Callable[[int, Image.Image], Any]


def latent_rgb_image(latents: np.ndarray, latent_rgb: Any, factor: int) -> Image.Image:
    """latents [C, h, w] (diffusion space) -> an RGB image of h*factor x w*factor."""
    w = np.asarray(latent_rgb, dtype=np.float32)
    c, h, wd = latents.shape
    rgb = latents.reshape(c, -1).T @ w[:-1] + w[-1]
    return _upscaled(rgb.reshape(h, wd, 3), factor)


def preview_decoder_image(latents: np.ndarray,
                          layers: Sequence[PreviewLayer] | Sequence[tuple[np.ndarray, np.ndarray]],
                          factor: int) -> Image.Image:
    """latents [C, h, w] (diffusion space) through the bundle's preview decoder (convolutions
    with zero padding, ReLU between) -> an RGB image of h*factor x w*factor. `layers`: the
    manifest's, or their (weight, bias) arrays (preview_decoder_arrays) when called often."""
    arrays = [x if isinstance(x, tuple) else _arrays(x) for x in layers]
    x = np.ascontiguousarray(latents, dtype=np.float32)
    for i, (weight, bias) in enumerate(arrays):
        x = conv2d(x, weight, bias)
        if i + 1 < len(arrays):
            np.maximum(x, 0, out=x)
    return _upscaled(x.transpose(1, 2, 0), factor)


def preview_decoder_arrays(layers: Sequence[PreviewLayer]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The manifest's layers as (weight [O, C, k, k], bias [O]) float32 arrays."""
    return [_arrays(x) for x in layers]


def _arrays(layer: PreviewLayer) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(layer.weight, np.float32).reshape(layer.shape),
            np.asarray(layer.bias, np.float32))


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x [C, h, w], weight [O, C, k, k] (odd k) -> [O, h, w]: stride 1, zero padding k // 2
    (torch's Conv2d(padding=k // 2)); one matrix product per kernel tap."""
    o, c, k, _ = weight.shape
    r, (_, h, w) = k // 2, x.shape
    padded = np.pad(x, ((0, 0), (r, r), (r, r)))
    out = np.repeat(bias.astype(np.float32)[:, None], h * w, axis=1)
    for dy in range(k):
        for dx in range(k):
            tap = np.ascontiguousarray(padded[:, dy:dy + h, dx:dx + w]).reshape(c, h * w)
            out += weight[:, :, dy, dx] @ tap
    return out.reshape(o, h, w)


def _upscaled(rgb: np.ndarray, factor: int) -> Image.Image:
    """rgb [h, w, 3] in [0, 1] at latent resolution -> PIL, `factor` times larger."""
    h, w = rgb.shape[:2]
    pixels = (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels, "RGB").resize((w * factor, h * factor),
                                                 Image.Resampling.BILINEAR)


@dataclass(frozen=True)
class Preview:
    """Live previews: `fn(step, image)` every `every` steps and at the last, drawn by
    `source`: "auto" (the map where the bundle has one, else the tiny decoder in memory mode
    fast), "map" (the cheapest: the bundle's preview decoder, else its linear map) or "tiny"
    (the sharpest, about 8 % of an SD 1.5 step; outside mode fast its memory is not in the
    plan). `fn`'s return value is ignored (cancel from the step callback).
    `pipe(..., preview=fn, preview_every=N)` is `Preview(fn, N)`."""

    fn: PreviewFn
    every: int = 1
    source: str = "auto"


PREVIEW_SOURCES = ("auto", "map", "tiny")


def preview_source(manifest: Manifest, mode: str, asked: str = "auto") -> str:
    """What draws the previews in memory mode `mode`: "tiny" (the tiny decoder) or "map"."""
    if asked != "auto":
        return asked
    vae = manifest.vae
    has_map = bool(vae.preview_decoder or vae.latent_rgb)
    return "tiny" if not has_map and vae.tiny_scaling_factor and mode == "fast" else "map"


def preview_maker(manifest: Manifest, mode: str, session: Callable[[str], Session],
                  asked: str = "auto") -> Callable[[np.ndarray], Image.Image]:
    """latents [B, C, h, w] (diffusion space) -> a PIL picture of the first image."""
    vae = manifest.vae
    if preview_source(manifest, mode, asked) == "tiny":
        return lambda z: to_pil(decode_latents_tiny(session(N.VAE_DECODER_TINY), z[:1],
                                                    vae.tiny_scaling_factor))[0]
    if vae.preview_decoder:
        arrays = preview_decoder_arrays(vae.preview_decoder)  # once per generation
        return lambda z: preview_decoder_image(z[0], arrays, vae.scale_factor)
    return lambda z: latent_rgb_image(z[0], vae.latent_rgb, vae.scale_factor)


def as_preview(preview: Any, every: Any, manifest: Manifest, mode: str) -> Preview | None:
    """`preview` (a callable or a Preview) and `preview_every`, checked before any work, for
    memory mode `mode`."""
    if preview is None:
        return None
    if not isinstance(preview, Preview):
        preview = Preview(preview, every)
    elif every != 1 and every != preview.every:  # two answers to one question
        raise InvalidInputError(f"preview_every={every!r} beside a Preview object with every="
                                f"{preview.every!r}: give it once, as Preview(fn, every)")
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
    if source == "map" and not (vae.latent_rgb or vae.preview_decoder):
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
