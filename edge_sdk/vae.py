"""VAE stages: latents -> images (decode) and images -> latents (encode)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import names as N
from .backends import Session
from .errors import InferenceError, ManifestError
from .manifest import Manifest, VaeSpec
from .tiling import Alloc, Stage, run_stages


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
    return _to_images(np.concatenate(images))


def _to_images(out: np.ndarray) -> np.ndarray:
    if not np.isfinite(out).all():
        raise InferenceError("the VAE decoder produced NaN/inf; use an fp32 VAE decoder "
                             "(`--precision vae=fp32`)")
    return np.clip(out / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


def decoder_stages(manifest: Manifest) -> list[dict[str, Any]] | None:
    """The bundle's VAE decoder stages (edge-convert --vae-stages), validated; None if absent."""
    raw = manifest.extra.get(N.VAE_STAGES)
    if raw is None:
        return None
    where = f"manifest extra.{N.VAE_STAGES}"
    if not isinstance(raw, list) or not raw:
        raise ManifestError(f"{where} must be a non-empty list; re-convert the bundle")
    for k, st in enumerate(raw):
        ok = (isinstance(st, dict) and st.get("component") in manifest.components
              and (st.get("groups") is None or _pos_int(st.get("groups")))
              and _pos_int(st.get("halo", -1), zero=True) and st.get("scale") in (1, 2)
              and isinstance(st.get("skips"), list)
              and all(isinstance(j, int) and -1 <= j < k for j in st["skips"])
              and isinstance(st.get("tiled"), bool)
              and isinstance(st.get("eps"), (int, float)) and st["eps"] > 0)
        if not ok:
            raise ManifestError(f"{where}[{k}] is malformed ({st!r}); re-convert the bundle")
    return raw


def _pos_int(v: Any, zero: bool = False) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if zero else v > 0)


def decode_latents_tiled(session: Callable[[str], Session], release: Callable[[str], None],
                         stages: list[dict[str, Any]], latents: np.ndarray, vae: VaeSpec,
                         tile: int, alloc: Alloc = np.empty) -> np.ndarray:
    """Like decode_latents, through the decoder's stages, tile by tile (`tile` latent pixels
    a side): the same image, with the full-resolution working set of one stage at a time.
    `release(component)` is called after each stage (low-memory plans unload it); `alloc`
    makes the full maps kept between stages (FileBackedMaps: out of private memory)."""
    def make(st: dict[str, Any]) -> Stage:
        name = st["component"]

        def run(tiles: list[np.ndarray], mean: Any, inv: Any) -> np.ndarray:
            feeds = {"x": tiles[0]}
            if st["skips"]:
                feeds["skip"] = tiles[1]
            if st["groups"]:
                feeds["mean"], feeds["inv_std"] = mean, inv
            return session(name).run(feeds)["y"]
        return Stage(run, st["groups"], st["halo"], st["scale"], tuple(st["skips"]),
                     st["tiled"], float(st["eps"]))

    z = unscale_latents(latents, vae)
    chain = [make(st) for st in stages]
    images = []
    for i in range(z.shape[0]):
        images.append(run_stages(z[i:i + 1], chain, tile,
                                 after_stage=lambda k: release(stages[k]["component"]),
                                 alloc=alloc))
    return _to_images(np.concatenate(images))


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
