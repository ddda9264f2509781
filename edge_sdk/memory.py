"""How much memory a generation needs, and whether this machine has it.

The estimate is of the activation peak, which at large sizes dwarfs the weights: the UNet's
self-attention at full latent resolution materialises one score matrix per head of
tokens x tokens floats (tokens = latent height x width), and the VAE decoder holds a few
full-resolution feature maps. Deliberately rough (within ~2x): it exists to refuse a request
that cannot fit *before* an hour of work ends in the kernel's OOM killer, not to plan tiles.
"""

from __future__ import annotations

from pathlib import Path

from .config import ResolvedConfig
from .errors import InvalidInputError
from .manifest import Manifest

# Typical of the SD family (SD 1.x: 8 heads at the first level; SD 2.x: 5 of 64 channels)
ASSUMED_HEADS = 8
# The VAE decoder's widest full-resolution stage: 128 channels, ~3 live maps (resnet in/out,
# skip), fp32
VAE_FULL_RES_BYTES_PER_PIXEL = 128 * 3 * 4


def estimate_peak_bytes(manifest: Manifest, cfg: ResolvedConfig) -> int:
    """Activation peak of one generation of `cfg` (bytes, fp32), the larger of the two
    stages that never run at the same time."""
    f = manifest.vae.scale_factor
    tokens = (cfg.height // f) * (cfg.width // f)
    batch = cfg.num_images * (2 if cfg.guidance else 1)
    attention = batch * ASSUMED_HEADS * tokens * tokens * 4
    vae = cfg.num_images * cfg.height * cfg.width * VAE_FULL_RES_BYTES_PER_PIXEL
    return max(attention, vae)


def available_bytes() -> int | None:
    """MemAvailable (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(manifest: Manifest, cfg: ResolvedConfig) -> None:
    """Raise InvalidInputError when the estimate exceeds the memory available now."""
    have = available_bytes()
    if have is None:
        return
    need = estimate_peak_bytes(manifest, cfg)
    if need > have:
        raise InvalidInputError(
            f"{cfg.width}x{cfg.height} x {cfg.num_images} image(s) needs about "
            f"{need / 2**30:.1f} GiB of working memory, {have / 2**30:.1f} GiB is available; "
            "choose a smaller size or fewer images per call")
