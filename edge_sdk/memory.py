"""How much memory a generation needs, and whether this machine has it.

The estimate is of the activation peak, which at large sizes dwarfs the weights: the UNet's
self-attention at full latent resolution materialises one score matrix per head of
tokens x tokens floats (tokens = latent height x width), and the VAE decoder holds a few
full-resolution feature maps. Deliberately rough (within ~2x): it exists to refuse a request
that cannot fit *before* an hour of work ends in the kernel's OOM killer, not to plan tiles.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import GenerationConfig
from .errors import InvalidInputError
from .manifest import Manifest

log = logging.getLogger(__name__)

# Typical of the SD family (SD 1.x: 8 heads at the first level; SD 2.x: 5 of 64 channels)
ASSUMED_HEADS = 8
# The VAE decoder's widest full-resolution stage: 128 channels, ~3 live maps (resnet in/out,
# skip), fp32
VAE_FULL_RES_BYTES_PER_PIXEL = 128 * 3 * 4


def estimate_peak_bytes(manifest: Manifest, cfg: GenerationConfig) -> int:
    """Activation peak of one generation of `cfg` (bytes, fp32), the larger of the two
    stages that never run at the same time."""
    f = manifest.vae.scale_factor
    tokens = (cfg.height // f) * (cfg.width // f)
    batch = cfg.num_images * (2 if cfg.guidance else 1)
    attention = batch * ASSUMED_HEADS * tokens * tokens * 4 // manifest.unet.attention_chunks
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


def check_fits(manifest: Manifest, cfg: GenerationConfig) -> None:
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


# -- the one memory knob ---------------------------------------------------------------------
MODES = ("fast", "balanced", "low")
# Low mode's VAE tile: 16 latent pixels = 128 image pixels a side (a 512x512 SD image in 16
# tiles per stage); exact whatever the size, so only speed and memory depend on it.
LOW_VAE_TILE = 16
# Balanced decodes in 4x fewer, larger tiles (256 px a side): faster than low's
BALANCED_VAE_TILE = 32


@dataclass(frozen=True)
class MemoryPlan:
    """How a pipeline trades speed for memory (what `memory=` chose; logged at load).

    fast:     every component resident; onnxruntime may repack weights into private memory
              and apply every graph optimization (the fastest).
    balanced: every component resident, weights left in the page cache (mapped external
              data: shareable, evictable), basic graph optimizations only, freed memory
              returned, each component's mapped weights taken out of the process's resident
              set after its stage (they stay cached: the next use maps them back from the
              page cache), the VAE decoded exactly in 32-latent tiles (maps in files) when
              the bundle has decoder stages.
    low:      as balanced, and each component loaded for its stage and released after (text
              encoder, then UNet, then VAE: never two large ones resident), classifier-free
              guidance as two batch-1 UNet passes (half the activation peak, same result), and
              the VAE decoded exactly in tiles when the bundle has decoder stages
              (edge-convert --vae-stages), the full-resolution maps kept between its stages
              in unlinked files under $EDGE_SDK_SPILL_DIR (default: the temp folder), i.e.
              evictable page cache rather than private memory.
    """

    mode: str
    map_weights: bool
    release_between_stages: bool
    batch_cfg: bool
    vae_tile: int | None = None  # latent pixels a side; None: untiled decoding
    spill_maps: bool = False  # tiled decoding keeps its between-stage maps in files
    return_freed: bool = False  # make the C heap give freed blocks back (return_freed_memory)
    drop_pages: bool = False  # after a stage, unmap its weights' pages (drop_mapped_pages)
    budget_bytes: int | None = None

    @property
    def spill_dir(self) -> str:
        return os.environ.get("EDGE_SDK_SPILL_DIR") or tempfile.gettempdir()

    def describe(self) -> str:
        parts = [f"memory mode {self.mode!r}"]
        if self.budget_bytes is not None:
            parts.append(f"for a budget of {self.budget_bytes / 2**20:.0f} MiB")
        parts.append("weights mapped" if self.map_weights else "weights may be repacked")
        parts.append("components loaded per stage" if self.release_between_stages
                     else "components resident")
        parts.append("guidance batched" if self.batch_cfg else "guidance as two passes")
        parts.append(f"VAE decoded in {self.vae_tile}-latent-pixel tiles" if self.vae_tile
                     else "VAE decoded whole")
        if self.spill_maps:
            parts.append(f"its maps kept in files under {self.spill_dir}")
        if self.return_freed:
            parts.append("freed memory returned to the system")
        if self.drop_pages:
            parts.append("weights dropped from the resident set between stages")
        return ", ".join(parts)


# (map_weights, release_between_stages, batch_cfg, vae_tile, spill_maps, return_freed,
#  drop_pages)
_PLANS = {"fast": (False, False, True, None, False, False, False),
          "balanced": (True, False, True, BALANCED_VAE_TILE, True, True, True),
          "low": (True, True, False, LOW_VAE_TILE, True, True, False)}


def parse_bytes(text: str) -> int:
    """'300MB', '1.5GB', '512MiB', '2G' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise InvalidInputError(f"memory={text!r} is neither a mode {MODES} nor a size such as "
                                "'300MB' or '2GB'")
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[m.group(2).upper()]
    return int(float(m.group(1)) * unit)


def plan_memory(memory: str, manifest: Manifest, default_peak: int) -> MemoryPlan:
    """The plan for `memory`: a mode name, or a budget ('300MB') for which the fastest mode
    whose estimate fits is chosen (`low` when none does, with a warning)."""
    if not isinstance(memory, str):
        raise InvalidInputError(f"memory must be one of {MODES} or a size such as '300MB', "
                                f"got {memory!r}")
    if memory in MODES:
        return MemoryPlan(memory, *_PLANS[memory])
    budget = parse_bytes(memory)
    sizes = [c.bytes for c in manifest.components.values()]
    total, largest = sum(sizes), max(sizes)
    need = {"fast": 2 * total + default_peak, "balanced": total + default_peak,
            "low": largest + default_peak // 2}
    for mode in MODES:
        if need[mode] <= budget:
            return MemoryPlan(mode, *_PLANS[mode], budget_bytes=budget)
    log.warning("memory budget %s is below the low mode's estimate (%.0f MiB); using low",
                memory, need["low"] / 2**20)
    return MemoryPlan("low", *_PLANS["low"], budget_bytes=budget)
