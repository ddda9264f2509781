"""Exact tiled decoding (edge_sdk.tiling) on a numpy fake of a VAE decoder: convolutions,
GroupNorms, a skip connection, a global (attention-like) stage and an upsampler. Tiled equals
untiled; per-tile GroupNorm statistics (what other stacks do) do not."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import InvalidInputError
from edge_sdk.tiling import Stage, group_stats, run_stages, tile_grid

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


@pytest.mark.parametrize("shape", [(1, 4, 12, 10), (2, 4, 9, 13)])
@pytest.mark.parametrize("tile", [1, 3, 4, 7])
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


def test_group_stats_and_grid():
    x = RNG.standard_normal((2, 8, 5, 7)).astype(np.float32)
    mean, inv = group_stats(x, 4, 1e-6)
    g = x.reshape(2, 4, -1)
    assert np.allclose(mean, g.mean(-1), atol=1e-6)
    assert np.allclose(inv, 1 / np.sqrt(g.var(-1) + 1e-6), rtol=1e-5)
    cells = list(tile_grid(5, 7, 3))
    covered = np.zeros((5, 7), int)
    for y0, y1, x0, x1 in cells:
        covered[y0:y1, x0:x1] += 1
    assert (covered == 1).all() and len(cells) == 6
    with pytest.raises(InvalidInputError):
        list(tile_grid(5, 7, 0))
    with pytest.raises(InvalidInputError, match="groups"):
        group_stats(x, 3, 1e-6)
    with pytest.raises(InvalidInputError, match="earlier stage"):
        run_stages(x, [Stage(lambda t, m, i: t[0], skips=(0,))], tile=2)


def test_file_backed_maps_give_the_same_result_and_leave_no_files(tmp_path):
    from edge_sdk.tiling import FileBackedMaps
    x = RNG.standard_normal((1, 4, 12, 10)).astype(np.float32)
    made = []
    alloc = FileBackedMaps(tmp_path)

    def counting(shape, dtype):
        made.append(alloc(shape, dtype))
        return made[-1]
    tiled = run_stages(x, STAGES, tile=3, alloc=counting)
    assert np.abs(tiled - decode(x)).max() < 1e-4 * np.abs(tiled).max()
    assert len(made) == len(STAGES) - 1  # every tiled stage's map (not the whole-map one)
    assert all(isinstance(m, np.memmap) for m in made)
    assert list(tmp_path.iterdir()) == []  # unlinked as soon as mapped
