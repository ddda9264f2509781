"""Exact tiled decoding (edge_sdk.tiling) on a numpy fake of a VAE decoder: convolutions,
GroupNorms, a skip connection, a global (attention-like) stage and an upsampler. Tiled equals
untiled; per-tile GroupNorm statistics (what other stacks do) do not."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import InvalidInputError
from edge_sdk.tiling import (MIN_STRIP_ROWS, GroupStats, Stage, group_stats, run_stages,
                             strip_rows)

RNG = np.random.default_rng(0)
GROUPS = 4


def conv3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Zero-padded 3x3 convolution, [B, Ci, H, W] x [Co, Ci, 3, 3]."""
    b, _, h, wd = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((b, w.shape[0], h, wd), np.float32)
    for dy in range(3):
        for dx in range(3):
            out += np.einsum("bchw,oc->bohw", p[:, :, dy:dy + h, dx:dx + wd], w[:, :, dy, dx])
    return out


def normalise(x: np.ndarray, mean: np.ndarray, inv: np.ndarray, gamma: np.ndarray,
              beta: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    g = x.reshape(b, GROUPS, c // GROUPS, h, w)
    g = (g - mean[:, :, None, None, None]) * inv[:, :, None, None, None]
    return g.reshape(b, c, h, w) * gamma[None, :, None, None] + beta[None, :, None, None]


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def weights(co: int, ci: int) -> np.ndarray:
    return (RNG.standard_normal((co, ci, 3, 3)) / np.sqrt(9 * ci)).astype(np.float32)


W = {"in": weights(16, 4), "a": weights(16, 16), "b": weights(16, 16), "up": weights(8, 16),
     "out": weights(3, 8)}
AFFINE = {k: ((1 + 0.2 * RNG.standard_normal(c)).astype(np.float32),
              (0.3 * RNG.standard_normal(c)).astype(np.float32))
          for k, c in (("a", 16), ("b", 16), ("attn", 16), ("up", 16), ("out", 8))}


def _gn(key: str):
    return lambda x, m, i: silu(normalise(x, m, i, *AFFINE[key]))


def _attention(tiles, m, i):  # global: every output pixel depends on the whole map
    h = normalise(tiles[0], m, i, *AFFINE["attn"])
    return tiles[0] + h.mean(axis=(2, 3), keepdims=True)


def _up(tiles, m, i):
    h = _gn("up")(tiles[0], m, i)
    return conv3x3(h.repeat(2, axis=2).repeat(2, axis=3), W["up"])


STAGES = [
    Stage(lambda t, m, i: conv3x3(t[0], W["in"])),                               # conv_in
    Stage(lambda t, m, i: conv3x3(_gn("a")(t[0], m, i), W["a"]), groups=GROUPS),  # resnet 1/2
    Stage(lambda t, m, i: t[1] + conv3x3(_gn("b")(t[0], m, i), W["b"]), groups=GROUPS,
          skips=(0,)),                                                           # resnet 2/2
    Stage(_attention, groups=GROUPS, tiled=False),                               # mid attention
    Stage(_up, groups=GROUPS, scale=2),                                          # upsample
    Stage(lambda t, m, i: conv3x3(_gn("out")(t[0], m, i), W["out"]), groups=GROUPS),  # out
]


def decode(x: np.ndarray) -> np.ndarray:
    """The untiled reference: each GroupNorm over the whole map."""
    return run_stages(x, STAGES, tile=10**6)


@pytest.mark.parametrize("shape", [(1, 4, 21, 10), (2, 4, 9, 13)])
@pytest.mark.parametrize("tile", [1, 7, 12])  # strips of 8 rows (the least), 8 and 15
def test_tiled_equals_untiled(shape, tile):
    x = RNG.standard_normal(shape).astype(np.float32)
    full = decode(x)
    assert full.shape == (shape[0], 3, shape[2] * 2, shape[3] * 2)
    tiled = run_stages(x, STAGES, tile=tile)
    assert np.abs(tiled - full).max() < 1e-4 * np.abs(full).max()


def test_per_tile_statistics_shift_tones_which_is_what_this_avoids():
    x = RNG.standard_normal((1, 4, 12, 12)).astype(np.float32)
    x[:, :, :, 6:] += 2.0  # the right half brighter: per-tile statistics differ
    full = decode(x)
    naive = np.concatenate([decode(x[:, :, :, :6]), decode(x[:, :, :, 6:])], axis=3)
    assert np.abs(naive - full).max() > 0.1 * np.abs(full).max()


def test_too_small_a_halo_is_not_exact():
    x = RNG.standard_normal((1, 4, 12, 12)).astype(np.float32)
    blind = [Stage(s.run, s.groups, 0, s.scale, s.skips, s.tiled) for s in STAGES]
    assert np.abs(run_stages(x, blind, tile=4) - decode(x)).max() > 1e-3


def test_group_stats_and_strips():
    x = RNG.standard_normal((2, 8, 5, 7)).astype(np.float32)
    mean, inv = group_stats(x, 4, 1e-6)
    g = x.reshape(2, 4, -1)
    assert np.allclose(mean, g.mean(-1), atol=1e-6)
    assert np.allclose(inv, 1 / np.sqrt(g.var(-1) + 1e-6), rtol=1e-5)
    for height, width, tile in ((5, 7, 3), (21, 4, 9), (40, 100, 30)):
        strips = list(strip_rows(height, width, tile))
        covered = np.zeros(height, int)
        for y0, y1 in strips:
            covered[y0:y1] += 1
        assert (covered == 1).all()
        rows = max(-(-tile * tile // width), MIN_STRIP_ROWS)
        assert all(y1 - y0 == rows for y0, y1 in strips[:-1])
    with pytest.raises(InvalidInputError):
        list(strip_rows(5, 7, 0))
    with pytest.raises(InvalidInputError, match="groups"):
        group_stats(x, 3, 1e-6)
    with pytest.raises(InvalidInputError, match="earlier stage"):
        run_stages(x, [Stage(lambda t, m, i: t[0], skips=(0,))], tile=2)


def test_statistics_gathered_block_by_block_equal_the_whole_maps():
    x = (1000.0 + 0.01 * RNG.standard_normal((2, 8, 30, 6))).astype(np.float32)  # mean >> std
    acc = GroupStats(4, 1e-12)
    for y0 in (0, 7, 8, 29):  # uneven blocks
        acc.add(x[:, :, y0:{0: 7, 7: 8, 8: 29, 29: 30}[y0]])
    mean, inv = acc.result()
    g = x.reshape(2, 4, -1).astype(np.float64)
    assert np.allclose(mean, g.mean(-1), rtol=1e-7)
    assert np.allclose(inv, 1 / np.sqrt(g.var(-1) + 1e-12), rtol=1e-4)


def test_maps_spilled_to_files_give_the_same_result_and_leave_no_files(tmp_path):
    from edge_sdk.spill import SpillFile, SpillMaps
    x = RNG.standard_normal((2, 4, 21, 10)).astype(np.float32)
    made = []
    alloc = SpillMaps(tmp_path)

    def counting(shape, dtype):
        made.append(alloc(shape, dtype))
        return made[-1]
    tiled = run_stages(x, STAGES, tile=3, alloc=counting)
    assert isinstance(tiled, np.ndarray)
    assert np.abs(tiled - decode(x)).max() < 1e-4 * np.abs(tiled).max()
    assert len(made) == len(STAGES) - 1  # every tiled stage's map (not the whole-map one)
    assert all(isinstance(m, SpillFile) for m in made)
    assert list(tmp_path.iterdir()) == []  # unlinked from the start
    small = SpillMaps(tmp_path, min_bytes=4 * 21 * 10 * 4 + 1)((1, 4, 21, 10), np.float32)
    assert isinstance(small, np.ndarray)  # below min_bytes: a file would save nothing


def test_a_spill_file_reads_back_what_was_written_in_any_strips(tmp_path):
    from edge_sdk.spill import SpillFile
    x = RNG.standard_normal((2, 3, 11, 5)).astype(np.float32)
    f = SpillFile(tmp_path, x.shape, np.float32)
    for y0, y1 in ((0, 4), (4, 9), (9, 11)):
        f.put(y0, x[:, :, y0:y1])
    assert np.array_equal(f.rows(0, 11), x)
    assert np.array_equal(f.rows(3, 7), x[:, :, 3:7])
    assert np.array_equal(f.rows(8, 20), x[:, :, 8:])  # clipped at the map's end


def test_spill_file_failures_are_typed_and_name_the_folder(tmp_path):
    from edge_sdk.errors import InferenceError
    from edge_sdk.spill import SpillFile, check_spill_folder, filesystem_type
    f = SpillFile(tmp_path, (1, 2, 4, 3), np.float32)
    with pytest.raises(InvalidInputError, match="do not fit"):
        f.put(2, np.zeros((1, 2, 3, 3), np.float32))  # rows 2..5 of a 4-row map
    f._file.close()  # what a vanished disk looks like to the next write
    with pytest.raises(InferenceError, match=f"could not write a decoder map in {tmp_path}"):
        f.put(0, np.zeros((1, 2, 1, 3), np.float32))
    with pytest.raises(InvalidInputError, match="every side"):
        SpillFile(tmp_path, (1, 2, 0, 3), np.float32)
    with pytest.raises(InvalidInputError, match="not a writable directory"):
        check_spill_folder(tmp_path / "missing")
    assert filesystem_type(tmp_path / "x") not in (None, "proc")
    from pathlib import Path
    assert filesystem_type(Path("/proc/self")) == "proc"
