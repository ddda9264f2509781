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

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import InferenceError, InvalidInputError

log = logging.getLogger(__name__)
SPILL_ENV = "EDGE_SDK_SPILL_DIR"
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")  # their files are memory: spilling there saves none
_typed: set[str] = set()  # spill folders whose filesystem was looked up (once per process)


class SpillFile:
    """A [B, C, H, W] map in an unlinked file under `folder` (nothing left behind, even
    after a crash); `rows(y0, y1)` reads a strip, `put(y0, block)` writes one."""

    def __init__(self, folder: str | os.PathLike[str], shape: tuple[int, ...],
                 dtype: np.dtype) -> None:
        if len(shape) != 4 or min(shape) < 1:
            raise InvalidInputError(f"a spilled map is [batch, channels, height, width] with "
                                    f"every side >= 1, not {tuple(shape)}")
        self.shape, self.dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        b, c, h, w = self.shape
        self._row_bytes = b * c * w * self.dtype.itemsize
        self.folder = folder
        with _io_errors(self, "create"):
            self._file = tempfile.TemporaryFile(dir=folder, prefix=".edge-sdk-map-")
            self._fd = self._file.fileno()
            os.ftruncate(self._fd, max(self._row_bytes * h, 1))

    def put(self, y0: int, block: np.ndarray) -> None:
        """Write rows y0.. of the map from `block` [B, C, rows, W]."""
        b, c, h, w = self.shape
        if block.ndim != 4 or (block.shape[0], block.shape[1], block.shape[3]) != (b, c, w) \
                or y0 < 0 or y0 + block.shape[2] > h:
            raise InvalidInputError(f"rows {y0}.. of shape {block.shape} do not fit a map of "
                                    f"shape {self.shape}")
        data = np.ascontiguousarray(block.transpose(2, 0, 1, 3), dtype=self.dtype)
        view, offset = memoryview(data).cast("B"), y0 * self._row_bytes
        with _io_errors(self, "write"):
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
        with _io_errors(self, "read"):
            while view:
                n = os.preadv(self._fd, [view], offset)
                if n == 0:
                    raise OSError(f"the file of a {self.shape} map ended early")
                view, offset = view[n:], offset + n
        return np.ascontiguousarray(buf.transpose(1, 2, 0, 3))


@contextlib.contextmanager
def _io_errors(spill: SpillFile, what: str) -> Iterator[None]:
    """OSError in a spill file's I/O -> InferenceError naming the folder and the fix."""
    try:
        yield
    except OSError as exc:
        mib = spill._row_bytes * spill.shape[2] / 2**20
        raise InferenceError(
            f"could not {what} a decoder map in {spill.folder} ({exc}); the tiled decoder "
            f"keeps its maps there (this one {mib:.0f} MiB): free space or set "
            f"${SPILL_ENV} to a folder on a disk with room") from exc


def check_spill_folder(folder: str | os.PathLike[str]) -> None:
    """Before any work: the folder must be a writable directory (InvalidInputError); one in
    memory (tmpfs) is warned about, since maps kept there are memory all the same."""
    path = Path(folder)
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise InvalidInputError(f"the spill folder {str(path)!r} (${SPILL_ENV}, default the "
                                "temp folder) is not a writable directory; set "
                                f"${SPILL_ENV} to one on a disk")
    if str(path) in _typed:  # a folder's filesystem is looked up (and warned about) once
        return
    _typed.add(str(path))
    kind = filesystem_type(path)
    if kind in MEMORY_FILESYSTEMS:
        log.warning("the spill folder %s is on %s (memory): the tiled decoder's maps kept "
                    "there count as memory; set $%s to a folder on a disk", path, kind,
                    SPILL_ENV)


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (Linux /proc/self/mountinfo), or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = os.path.realpath(path), "", None
    for line in lines:
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) < 5 or not rest:
            continue
        mount = parts[4].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) \
                and len(mount) >= len(best):
            best, kind = mount, rest.split()[0]
    return kind


class SpillMaps:
    """An `Alloc` (edge_sdk.tiling) for tiled decoding whose maps of `min_bytes` or more live
    in SpillFiles under `folder`; smaller ones stay arrays (a file would save nothing)."""

    def __init__(self, folder: str | os.PathLike[str], min_bytes: int = 0) -> None:
        self.folder, self.min_bytes = folder, min_bytes

    def __call__(self, shape: tuple[int, ...], dtype: np.dtype) -> "np.ndarray | SpillFile":
        if int(np.prod(shape)) * np.dtype(dtype).itemsize < self.min_bytes:
            return np.empty(shape, dtype)
        return SpillFile(self.folder, shape, dtype)
