"""VAE stages: latents -> images (decode) and images -> latents (encode)."""

from __future__ import annotations

import numpy as np

from . import names as N
from .backends import Session
from .errors import InferenceError
from .manifest import VaeSpec


def unscale_latents(latents: np.ndarray, vae: VaeSpec) -> np.ndarray:
    """Diffusion-space latents -> the VAE's own latent space (scaling/shift from the manifest)."""
    z = latents / np.float32(vae.scaling_factor)
    if vae.shift_factor is not None:
        z = z + np.float32(vae.shift_factor)
    return z.astype(np.float32, copy=False)


def decode_latents(decoder: Session, latents: np.ndarray, vae: VaeSpec) -> np.ndarray:
    """Decode [B, C, h, w] latents to float images [B, H, W, 3] in [0, 1], one at a time
    (the decoder's activations are the largest of a generation)."""
    z = unscale_latents(latents, vae)
    images = []
    for i in range(z.shape[0]):
        img = decoder.run({N.VAE_LATENTS: z[i:i + 1]})[N.VAE_IMAGE]
        images.append(img)
    out = np.concatenate(images)
    if not np.isfinite(out).all():
        raise InferenceError("the VAE decoder produced NaN/inf; use an fp32 VAE decoder "
                             "(`--precision vae=fp32`)")
    return np.clip(out / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def encode_images(encoder: Session, images: np.ndarray, vae: VaeSpec,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Encode float images [B, H, W, 3] in [0, 1] to diffusion-space latents: the mean of the
    latent distribution, or a sample from it when `rng` is given."""
    x = (images.transpose(0, 3, 1, 2) * 2 - 1).astype(np.float32)
    out = encoder.run({N.VAE_IMAGE: x})
    z = out[N.VAE_LATENT_MEAN]
    if rng is not None:
        std = np.exp(0.5 * out[N.VAE_LATENT_LOGVAR])
        z = z + std * rng.standard_normal(z.shape, dtype=np.float32)
    if vae.shift_factor is not None:
        z = z - np.float32(vae.shift_factor)
    return (z * np.float32(vae.scaling_factor)).astype(np.float32)
