"""Feature maps kept in files while a tiled decode runs (edge_sdk.tiling's maps between
stages), so that a memory cap need not hold them.

A map [B, C, H, W] is stored rows-outermost ([H, B, C, W]) in an unlinked temporary file:
a strip of rows, which is what tiled decoding reads and writes, is then one contiguous
`pread`/`pwrite`. Explicit reads and writes rather than a memory map: a map is read
strip by strip once or twice and never needs to be resident, and under a cgroup memory cap
the page cache it leaves must be cheap to drop (clean, not mapped), else reclaim stalls the
process on writeback far longer than the I/O itself takes.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np


class SpillFile:
    """A [B, C, H, W] map in an unlinked file under `folder` (nothing left behind, even
    after a crash); `rows(y0, y1)` reads a strip, `put(y0, block)` writes one."""

    def __init__(self, folder: str | os.PathLike[str], shape: tuple[int, ...],
                 dtype: np.dtype) -> None:
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        b, c, h, w = self.shape
        self._row_bytes = b * c * w * self.dtype.itemsize
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".edge-sdk-map-")
        self._fd = self._file.fileno()
        os.ftruncate(self._fd, max(self._row_bytes * h, 1))

    def put(self, y0: int, block: np.ndarray) -> None:
        """Write rows y0.. of the map from `block` [B, C, rows, W]."""
        data = np.ascontiguousarray(block.transpose(2, 0, 1, 3), dtype=self.dtype)
        view, offset = memoryview(data).cast("B"), y0 * self._row_bytes
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n
        if hasattr(os, "posix_fadvise"):  # not on macOS
            # start writing the rows out now: by the time a cap needs the memory they are
            # clean page cache, dropped at no cost
            os.posix_fadvise(self._fd, y0 * self._row_bytes, data.nbytes,
                             os.POSIX_FADV_DONTNEED)

    def rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows y0:y1 of the map, [B, C, y1 - y0, W] (a fresh array)."""
        b, c, h, w = self.shape
        y1 = min(y1, h)
        buf = np.empty((max(y1 - y0, 0), b, c, w), self.dtype)
        view, offset = memoryview(buf).cast("B"), y0 * self._row_bytes
        while view:
            n = os.preadv(self._fd, [view], offset)
            if n == 0:
                raise OSError(f"the spill file of a {self.shape} map ended early")
            view, offset = view[n:], offset + n
        return np.ascontiguousarray(buf.transpose(1, 2, 0, 3))


class SpillMaps:
    """An `Alloc` (edge_sdk.tiling) for tiled decoding whose maps of `min_bytes` or more live
    in SpillFiles under `folder`; smaller ones stay arrays (a file would save nothing)."""

    def __init__(self, folder: str | os.PathLike[str], min_bytes: int = 0) -> None:
        self.folder, self.min_bytes = folder, min_bytes

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> "np.ndarray | SpillFile":
        if int(np.prod(shape)) * np.dtype(dtype).itemsize < self.min_bytes:
            return np.empty(shape, dtype)
        return SpillFile(self.folder, shape, dtype)
