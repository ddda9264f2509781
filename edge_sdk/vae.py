"""VAE stages: latents -> images (decode), images -> latent moments (encode), whole or in
exact tiles, and the latent scaling both directions use."""

from __future__ import annotations

from typing import Any, Callable, Protocol

import numpy as np

from .backends import Session
from .contracts import StageIO, VaeIO
from .errors import InferenceError
from .manifest import DecoderStage, VaeSpec
from .tiling import Alloc, Stage, run_stages


class StageSessions(Protocol):
    """Where tiled decoding gets each stage's session and says it is done with it
    (edge_sdk.components.Components)."""

    def session(self, role: str) -> Session: ...

    def done_with(self, role: str) -> None: ...


def unscale_latents(latents: np.ndarray, vae: VaeSpec) -> np.ndarray:
    """Diffusion-space latents -> the VAE's own latent space (scaling/shift from the manifest)."""
    z = latents / np.float32(vae.scaling_factor)
    if vae.shift_factor is not None:
        z = z + np.float32(vae.shift_factor)
    return z.astype(np.float32, copy=False)


def scale_latents(z: np.ndarray, vae: VaeSpec) -> np.ndarray:
    """The VAE's latent space -> diffusion-space latents (the inverse of unscale_latents)."""
    if vae.shift_factor is not None:
        z = z - np.float32(vae.shift_factor)
    return (z * np.float32(vae.scaling_factor)).astype(np.float32)


def decode_latents(decoder: Session, latents: np.ndarray, vae: VaeSpec) -> np.ndarray:
    """Decode [B, C, h, w] latents to float images [B, H, W, 3] in [0, 1], one at a time
    (the decoder's activations are the largest of a generation)."""
    return _decode_each(decoder, unscale_latents(latents, vae))


def decode_latents_tiny(decoder: Session, latents: np.ndarray, scaling: float) -> np.ndarray:
    """Like decode_latents, with a tiny decoder (AutoencoderTiny: latents / its own scaling,
    as diffusers' pipelines feed it)."""
    return _decode_each(decoder, (latents / np.float32(scaling)).astype(np.float32))


def _decode_each(decoder: Session, z: np.ndarray) -> np.ndarray:
    """The decoder's latents [B, C, h, w] decoded one image at a time."""
    return _to_images(np.concatenate([decoder.run({VaeIO.LATENTS: z[i:i + 1]})[VaeIO.IMAGE]
                                      for i in range(z.shape[0])]))


def _to_images(out: np.ndarray) -> np.ndarray:
    if not np.isfinite(out).all():
        raise InferenceError("the VAE decoder produced NaN/inf; use an fp32 VAE decoder "
                             "(`--precision vae=fp32`)")
    return np.clip(out / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def _stage(spec: DecoderStage, sessions: StageSessions) -> Stage:
    def run(tiles: list[np.ndarray], mean: Any, inv: Any) -> np.ndarray:
        feeds = {StageIO.X: tiles[0]}
        if spec.skips:
            feeds[StageIO.SKIP] = tiles[1]
        if spec.groups:
            feeds[StageIO.MEAN], feeds[StageIO.INV_STD] = mean, inv
        return sessions.session(spec.component).run(feeds)[StageIO.Y]
    return Stage(run, spec.groups, spec.halo, spec.scale, spec.skips, spec.tiled, spec.eps,
                 spec.down)


def decode_latents_tiled(sessions: StageSessions, latents: np.ndarray, vae: VaeSpec,
                         tile: int, alloc: Alloc = np.empty) -> np.ndarray:
    """Like decode_latents, through the decoder's stages (`vae.decoder_stages`), tile by
    tile (`tile` latent pixels a side): the same image, with the full-resolution working set
    of one stage at a time. `sessions.done_with(role)` is called after each stage (low-memory
    plans unload it); `alloc` makes the full maps kept between stages (SpillMaps: out of
    private memory)."""
    stages = vae.decoder_stages
    chain = [_stage(st, sessions) for st in stages]
    release: Callable[[int], None] = lambda k: sessions.done_with(stages[k].component)  # noqa
    z = unscale_latents(latents, vae)
    images = [run_stages(z[i:i + 1], chain, tile, after_stage=release, alloc=alloc)
              for i in range(z.shape[0])]
    return _to_images(np.concatenate(images))


def encode_images(encoder: Session, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float images [1, H, W, 3] in [0, 1] -> the latent distribution (mean, logvar) in the
    VAE's own latent space (the graph clamps logvar as diffusers does)."""
    out = encoder.run({VaeIO.IMAGE: _to_input(images)})
    return _checked(out[VaeIO.LATENT_MEAN], out[VaeIO.LATENT_LOGVAR])


def encode_images_tiled(sessions: StageSessions, images: np.ndarray, vae: VaeSpec, tile: int,
                        alloc: Alloc = np.empty) -> tuple[np.ndarray, np.ndarray]:
    """Like encode_images, through the encoder's stages (`vae.encoder_stages`), in strips of
    about `tile` x `tile` image pixels: the same moments with one stage's full-resolution
    working set at a time (the largest maps are the encoder's first level, at full image
    resolution)."""
    stages = vae.encoder_stages
    chain = [_stage(st, sessions) for st in stages]
    release: Callable[[int], None] = lambda k: sessions.done_with(stages[k].component)  # noqa
    moments = run_stages(_to_input(images), chain, tile, after_stage=release, alloc=alloc)
    mean, logvar = np.split(moments, 2, axis=1)
    return _checked(mean, np.clip(logvar, -30.0, 20.0))  # as DiagonalGaussianDistribution


def _to_input(images: np.ndarray) -> np.ndarray:
    return (images.transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32)


def _checked(mean: np.ndarray, logvar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not (np.isfinite(mean).all() and np.isfinite(logvar).all()):
        raise InferenceError("the VAE encoder produced NaN/inf; use an fp32 VAE "
                             "(`--precision vae=fp32`)")
    return np.ascontiguousarray(mean), np.ascontiguousarray(logvar)
