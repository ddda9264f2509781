"""Exact tiled execution of a convolutional decoder split into stages at its GroupNorms.

Why not just decode tiles and blend them: a VAE decoder's GroupNorms normalise with the mean
and variance of the *whole* feature map. Decoding a tile alone computes them over the tile,
so each tile gets its own tone (the seams and colour shifts users of other stacks see), and
no amount of overlap blending makes the result equal to the untiled one.

The exact scheme: the decoder is a chain of stages, each starting at a GroupNorm (or at the
input). Between stages the full-resolution activation is kept (the memory this costs is one
or two feature maps, not the decoder's whole working set); each stage's GroupNorm statistics
are computed over that whole activation, then the stage runs tile by tile, each tile read
with a halo of context wide enough for the stage's convolutions, and only the tile's core is
kept. The result equals the untiled decoder's up to float rounding.

Stages are callables (an onnxruntime session per stage in the runtime; numpy fakes in the
tests), so this module knows nothing about the backend.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from .errors import InvalidInputError

# alloc(shape, dtype) -> a writable array for a stage's full output map (np.empty, or one
# backed by a file so that the maps kept between stages are not private memory)
Alloc = Callable[[tuple[int, ...], np.dtype], np.ndarray]

# run(tiles, mean, inv_std) -> output tile. `tiles` holds the main input's crop first, then
# each skip input's crop (same region); mean / inv_std are [batch, groups] or None.
StageFn = Callable[[list[np.ndarray], "np.ndarray | None", "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class Stage:
    """One stage of a decoder, from a GroupNorm (or the input) to the next GroupNorm."""

    run: StageFn
    groups: int | None = None  # GroupNorm groups applied to the main input; None: none
    halo: int = 1  # input pixels of context each side (the stage's receptive-field radius)
    scale: int = 1  # output pixels per input pixel (2 for an upsampling stage)
    skips: tuple[int, ...] = ()  # earlier stage outputs fed as extra inputs (-1: the input)
    tiled: bool = True  # False: run on the whole map (global attention at latent resolution)
    eps: float = 1e-6


def group_stats(x: np.ndarray, groups: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """GroupNorm's mean and 1/sqrt(var + eps) per (batch, group) over the whole map [B,C,H,W],
    accumulated in float64 so the order of summation does not show. One group at a time: a
    float64 copy of the whole map would be twice the map, at the stage whose memory tiling
    exists to bound."""
    b, c = x.shape[:2]
    if c % groups:
        raise InvalidInputError(f"{c} channels do not split into {groups} groups")
    g = x.reshape(b, groups, -1)
    mean = np.empty((b, groups), np.float64)
    var = np.empty((b, groups), np.float64)
    for i in range(b):
        for j in range(groups):
            d = g[i, j].astype(np.float64)
            mean[i, j] = m = d.mean()
            d -= m
            var[i, j] = np.dot(d, d) / d.size
    return mean.astype(np.float32), (1.0 / np.sqrt(var + eps)).astype(np.float32)


def tile_grid(height: int, width: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """Core regions (y0, y1, x0, x1) of `tile`-sized tiles covering the map, last ones short."""
    if tile < 1:
        raise InvalidInputError(f"tile must be at least 1 pixel, got {tile}")
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            yield y0, min(y0 + tile, height), x0, min(x0 + tile, width)


def run_stage_tiled(inputs: Sequence[np.ndarray], stage: Stage, tile: int,
                    alloc: Alloc = np.empty) -> np.ndarray:
    """One stage over full maps `inputs` (main first, then skips), tile by tile, into a map
    from `alloc`."""
    main = inputs[0]
    mean = inv = None
    if stage.groups:
        mean, inv = group_stats(main, stage.groups, stage.eps)
        unmap_pages(main)
    if not stage.tiled:
        return stage.run(list(inputs), mean, inv)
    h, w, s, halo = main.shape[2], main.shape[3], stage.scale, stage.halo
    out: np.ndarray | None = None
    for y0, y1, x0, x1 in tile_grid(h, w, tile):
        ya, yb, xa, xb = max(0, y0 - halo), min(h, y1 + halo), max(0, x0 - halo), min(w, x1 + halo)
        res = stage.run([a[:, :, ya:yb, xa:xb] for a in inputs], mean, inv)
        if res.shape[2:] != ((yb - ya) * s, (xb - xa) * s):
            raise InvalidInputError(f"a stage returned a {res.shape[2:]} tile for a "
                                    f"{(yb - ya, xb - xa)} input at scale {s}")
        if out is None:
            out = alloc((main.shape[0], res.shape[1], h * s, w * s), res.dtype)
        oy, ox = (y0 - ya) * s, (x0 - xa) * s
        out[:, :, y0 * s:y1 * s, x0 * s:x1 * s] = \
            res[:, :, oy:oy + (y1 - y0) * s, ox:ox + (x1 - x0) * s]
        unmap_pages(out, *inputs)
    assert out is not None
    return out


def run_stages(x: np.ndarray, stages: Sequence[Stage], tile: int,
               after_stage: Callable[[int], None] | None = None,
               alloc: Alloc = np.empty) -> np.ndarray:
    """Run the chain of `stages` on `x` [B, C, H, W], each stage tiled with cores of `tile`
    pixels of `x` (so `tile * 2**k` pixels after k upsampling stages: the same tile grid
    throughout). Activations are kept only while a later stage needs them as a skip."""
    last_use = {-1: 0}
    for k, st in enumerate(stages):
        for j in st.skips:
            if j >= k:
                raise InvalidInputError(f"stage {k} takes stage {j}'s output as a skip input; "
                                        "a skip must come from an earlier stage")
            last_use[j] = k
    kept: dict[int, np.ndarray] = {-1: x}
    current, scale = x, 1
    for k, st in enumerate(stages):
        current = run_stage_tiled([current] + [kept[j] for j in st.skips], st, tile * scale,
                                  alloc)
        scale *= st.scale
        if after_stage is not None:
            after_stage(k)
        kept = {j: a for j, a in kept.items() if last_use.get(j, -1) > k}
        if last_use.get(k, -1) > k:
            kept[k] = current
    return current


class FileBackedMaps:
    """An `Alloc` whose arrays live in unlinked files under `folder`: the full-resolution
    maps kept between stages (an SD VAE's last stages hold 128 channels x 512 x 512 fp32 =
    128 MB each, two or three at a time) become page cache the kernel can write back and
    evict under memory pressure, instead of private memory it cannot. The files are
    unlinked as soon as they are mapped, so nothing is left behind, even after a crash."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = folder

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".edge-sdk-map-") as f:
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            f.truncate(max(size, 1))
            return np.memmap(f.name, dtype=dtype, mode="r+", shape=shape)


def unmap_pages(*arrays: np.ndarray) -> None:
    """Drop file-backed maps' pages from this process (MADV_DONTNEED on a shared file
    mapping: the data stays in the file and the page cache, a later access faults it back
    in), so a spilled map counts in neither private memory nor RSS between tile accesses.
    Plain arrays are left alone."""
    advice = getattr(mmap, "MADV_DONTNEED", None)  # not on every platform
    for a in arrays:
        mm = getattr(a, "_mmap", None)
        if advice is not None and mm is not None and hasattr(mm, "madvise"):
            mm.madvise(advice)
