"""The one memory knob: the memory modes, and the plan a mode name or a budget chooses.

A budget ("300MB", "1GiB") is planned for the generation asked: the fastest mode whose
estimated peak (edge_sdk.estimate) fits it, or a refusal saying what the lowest mode needs.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass

from .config import GenerationConfig
from .errors import InvalidInputError
from .estimate import estimate_peak_bytes
from .manifest import Manifest
from .spill import SPILL_ENV


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
              the VAE decoded exactly in smaller tiles when the bundle has decoder stages
              (edge-convert exports them by default), the full-resolution maps kept between
              its stages in unlinked files under $EDGE_SDK_SPILL_DIR (default: the temp
              folder, edge_sdk.spill) rather than in private memory.
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
        return os.environ.get(SPILL_ENV) or tempfile.gettempdir()

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


# A mode is chosen for a budget only if its estimate, times this, fits: the estimate was up
# to 9 % below the measured peak (fast mode at 384 px, held out of the fit: 279 against 306
# MiB, which a 300MB budget would otherwise have chosen; tests/bench/memory_plan.py).
PLAN_MARGIN = 1.10

# SI units are powers of 10 (MB = 10^6 bytes), IEC units powers of 2 (MiB = 2^20); a bare
# K/M/G/T is binary, as in `docker run -m 300m`
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'300MB' (10^6), '512MiB' (2^20), '1.5GB', '2G' (binary) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text, re.IGNORECASE)
    if not m or m.group(2).lower() not in _UNITS:
        raise InvalidInputError(f"memory={text!r} is neither a mode {MODES} nor a size such as "
                                "'300MB' (10^6 bytes) or '512MiB' (2^20)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not value < 2**63:
        raise InvalidInputError(f"memory={text!r} is larger than any machine")
    return int(value)


def plan_memory(memory: str, manifest: Manifest, cfg: GenerationConfig) -> MemoryPlan:
    """The plan for `memory`: a mode name, or a budget for which the fastest mode whose
    estimated peak for the resolved `cfg`, times PLAN_MARGIN, fits is chosen; a budget no
    mode fits is an InvalidInputError naming what the lowest needs."""
    if not isinstance(memory, str):
        raise InvalidInputError(f"memory must be one of {MODES} or a size such as '300MB', "
                                f"got {memory!r}")
    if memory in MODES:
        return MemoryPlan(memory, *_PLANS[memory])
    budget = parse_bytes(memory)
    for mode in MODES:
        need = estimate_peak_bytes(manifest, cfg, mode)
        if need * PLAN_MARGIN <= budget:
            return MemoryPlan(mode, *_PLANS[mode], budget_bytes=budget)
    raise InvalidInputError(
        f"memory budget {memory} ({budget / 2**20:.0f} MiB) is below what the lowest mode "
        f"needs for {cfg.width}x{cfg.height} x {cfg.num_images} image(s): about "
        f"{need / 2**20:.0f} MiB; choose a smaller size or a larger budget")
