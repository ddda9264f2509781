"""Exact tiled execution of a convolutional decoder split into stages at its GroupNorms.

Why not just decode tiles and blend them: a VAE decoder's GroupNorms normalise with the mean
and variance of the *whole* feature map. Decoding a tile alone computes them over the tile,
so each tile gets its own tone (the seams and colour shifts users of other stacks see), and
no amount of overlap blending makes the result equal to the untiled one.

The exact scheme: the decoder is a chain of stages, each starting at a GroupNorm (or at the
input). Between stages the full-resolution activation is kept (the memory this costs is one
or two feature maps, not the decoder's whole working set); each stage's GroupNorm statistics
are computed over that whole activation (gathered while the stage before writes it), then
the stage runs tile by tile, each tile read with a halo of context wide enough for the
stage's convolutions, and only the tile's core is kept. The result equals the untiled
decoder's up to float rounding. The tiles are full-width strips of rows, so that a map kept
in a file is read and written in whole pages, each once per stage.

Stages are callables (an onnxruntime session per stage in the runtime; numpy fakes in the
tests), so this module knows nothing about the backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence, Union

import numpy as np

from .errors import InvalidInputError


class RowStore(Protocol):
    """A [B, C, H, W] map kept elsewhere than in an array (edge_sdk.spill.SpillFile: in a
    file), read and written a strip of rows at a time."""

    shape: tuple[int, ...]

    def rows(self, y0: int, y1: int) -> np.ndarray: ...

    def put(self, y0: int, block: np.ndarray) -> None: ...


Map = Union[np.ndarray, RowStore]
# alloc(shape, dtype) -> where a stage's full output map goes (np.empty, or a RowStore so
# that the maps kept between stages are not private memory)
Alloc = Callable[[tuple[int, ...], np.dtype], Map]


def read_rows(m: Map, y0: int, y1: int) -> np.ndarray:
    """Rows y0:y1 of a map, [B, C, rows, W]."""
    return m[:, :, y0:y1] if isinstance(m, np.ndarray) else m.rows(y0, y1)


def write_rows(m: Map, y0: int, block: np.ndarray) -> None:
    """Rows y0.. of a map from `block` [B, C, rows, W]."""
    if isinstance(m, np.ndarray):
        m[:, :, y0:y0 + block.shape[2]] = block
    else:
        m.put(y0, block)


def whole(m: Map) -> np.ndarray:
    return m if isinstance(m, np.ndarray) else m.rows(0, m.shape[2])

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
    down: int = 1  # input pixels per output pixel (2 for a stride-2 stage; halo a multiple)


# the fewest core rows a strip has (where tile**2 / width would give fewer): a halo row each
# side costs 2 / MIN_STRIP_ROWS of the stage's work at most
MIN_STRIP_ROWS = 8
Stats = tuple[np.ndarray, np.ndarray]  # GroupNorm's mean and 1/sqrt(var + eps), [B, groups]


class GroupStats:
    """GroupNorm's statistics of a map [B, C, H, W] fed block by block (rows of it),
    accumulated in float64 across blocks. Sums are taken about the first block's mean, so a
    large mean does not cancel the variance away; within a block the squares are a float32
    dot product (BLAS: the same rounding as onnxruntime's own GroupNorm, and no float64 copy
    of each block)."""

    def __init__(self, groups: int, eps: float) -> None:
        self.groups, self.eps = groups, eps
        self.shift: np.ndarray | None = None
        self.total = self.squares = None  # type: np.ndarray | None
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        b, c = block.shape[:2]
        if c % self.groups:
            raise InvalidInputError(f"{c} channels do not split into {self.groups} groups")
        v = block.reshape(b, self.groups, -1, *block.shape[2:])  # a view: channels split
        if self.shift is None:
            self.shift = v.mean(axis=(2, 3, 4), dtype=np.float64,
                                keepdims=True).astype(np.float32)
            self.total = np.zeros((b, self.groups))
            self.squares = np.zeros((b, self.groups))
        d = (v - self.shift).reshape(b, self.groups, -1)
        self.total += d.sum(axis=-1, dtype=np.float64)
        self.squares += [[np.dot(g, g) for g in batch] for batch in d]
        self.count += d.shape[-1]

    def result(self) -> Stats:
        if self.shift is None or self.total is None or self.squares is None or not self.count:
            raise InvalidInputError("GroupNorm statistics of an empty map")
        m = self.total / self.count
        var = np.maximum(self.squares / self.count - m * m, 0.0)
        mean = m + self.shift.reshape(m.shape)
        return mean.astype(np.float32), (1.0 / np.sqrt(var + self.eps)).astype(np.float32)


def group_stats(x: Map, groups: int, eps: float) -> Stats:
    """GroupNorm's mean and 1/sqrt(var + eps) per (batch, group) over the whole map
    [B, C, H, W], read a few rows at a time: a float64 copy of the whole map would be twice
    the map, at the stage whose memory tiling exists to bound."""
    acc = GroupStats(groups, eps)
    for y0 in range(0, max(x.shape[2], 1), MIN_STRIP_ROWS):
        acc.add(read_rows(x, y0, y0 + MIN_STRIP_ROWS))
    return acc.result()


def strip_rows(height: int, width: int, tile: int, multiple: int = 1
               ) -> Iterator[tuple[int, int]]:
    """Row ranges (y0, y1) of full-width strips covering a height x width map, each about
    `tile` x `tile` pixels in area (at least MIN_STRIP_ROWS rows, a multiple of `multiple`),
    the last one short. Full-width strips because a map kept in a file is read and written
    in whole pages: a square tile of a row-major map would touch every page of its rows for
    a part of each."""
    if tile < 1:
        raise InvalidInputError(f"tile must be at least 1 pixel, got {tile}")
    rows = max(-(-tile * tile // max(width, 1)), MIN_STRIP_ROWS)
    rows += -rows % multiple
    for y0 in range(0, height, rows):
        yield y0, min(y0 + rows, height)


def run_stage_tiled(inputs: Sequence[Map], stage: Stage, tile: int,
                    alloc: Alloc = np.empty, stats: Stats | None = None,
                    out_norm: tuple[int, float] | None = None) -> tuple[Map, Stats | None]:
    """One stage over full maps `inputs` (main first, then skips), strip by strip, into a
    map from `alloc`. `stats` are the GroupNorm statistics of the main input when the stage
    has groups (computed here when not given); `out_norm` = (groups, eps) asks for the
    output's statistics too, accumulated as the strips are written (for the next stage:
    the map is not read again for them). Returns the output map and its statistics."""
    main = inputs[0]
    if stage.groups and stats is None:
        stats = group_stats(main, stage.groups, stage.eps)
    mean, inv = stats if stage.groups and stats is not None else (None, None)
    if not stage.tiled:
        out = stage.run([whole(a) for a in inputs], mean, inv)
        return out, group_stats(out, *out_norm) if out_norm else None
    acc = GroupStats(*out_norm) if out_norm else None
    h, w, halo, d = main.shape[2], main.shape[3], stage.halo, stage.down
    if d > 1 and (h % d or w % d or halo % d):
        raise InvalidInputError(f"a stride-{d} stage needs map sides and a halo that are "
                                f"multiples of {d}, got {h}x{w}, halo {halo}")

    def at(y: int) -> int:  # input row -> output row
        return y * stage.scale // d
    out: Map | None = None
    for y0, y1 in strip_rows(h, w, tile, d):
        ya, yb = max(0, y0 - halo), min(h, y1 + halo)
        res = stage.run([read_rows(a, ya, yb) for a in inputs], mean, inv)
        if res.shape[2:] != (at(yb) - at(ya), at(w)):
            raise InvalidInputError(f"a stage returned a {res.shape[2:]} strip for a "
                                    f"{(yb - ya, w)} input at scale {stage.scale}/{d}")
        if out is None:
            out = alloc((main.shape[0], res.shape[1], at(h), at(w)), res.dtype)
        core = res[:, :, at(y0) - at(ya):at(y1) - at(ya)]
        write_rows(out, at(y0), core)
        if acc is not None:
            acc.add(core)
    assert out is not None
    return out, acc.result() if acc is not None else None


def run_stages(x: np.ndarray, stages: Sequence[Stage], tile: int,
               after_stage: Callable[[int], None] | None = None,
               alloc: Alloc = np.empty) -> np.ndarray:
    """Run the chain of `stages` on `x` [B, C, H, W], each stage in strips of about `tile`
    x `tile` pixels of `x` (so `tile * 2**k` after k upsampling stages, `tile / 2**k` after
    k downsampling ones, at least 1). Activations are
    kept only while a later stage needs them as a skip; each GroupNorm's statistics are
    gathered while the stage before it writes its output."""
    last_use = {-1: 0}
    for k, st in enumerate(stages):
        for j in st.skips:
            if j >= k:
                raise InvalidInputError(f"stage {k} takes stage {j}'s output as a skip input; "
                                        "a skip must come from an earlier stage")
            last_use[j] = k
    kept: dict[int, Map] = {-1: x}
    current, scale, stats = x, 1, None
    for k, st in enumerate(stages):
        nxt = stages[k + 1] if k + 1 < len(stages) else None
        out_norm = (nxt.groups, nxt.eps) if nxt is not None and nxt.groups else None
        current, stats = run_stage_tiled([current] + [kept[j] for j in st.skips], st,
                                         max(1, int(tile * scale)), alloc, stats, out_norm)
        scale = scale * st.scale / st.down
        if after_stage is not None:
            after_stage(k)
        kept = {j: a for j, a in kept.items() if last_use.get(j, -1) > k}
        if last_use.get(k, -1) > k:
            kept[k] = current
    return whole(current)
