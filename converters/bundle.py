"""Writing a bundle folder atomically, and describing its files for the manifest.

The bundle is assembled in a hidden sibling folder, fsynced, and renamed into place only when
complete, so a crash or kill leaves either no bundle or the previous complete one.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from edge_sdk.errors import ConversionError
from edge_sdk.manifest import FileEntry, Manifest, TensorSpec, sha256_file
from edge_sdk import names as N

log = logging.getLogger(__name__)

# written into every staging folder: a folder without it is never swept as ours
STAGING_MARK = ".edge-convert-staging"

_ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 11: "float64", 9: "bool",
                2: "uint8", 3: "int8"}


class AtomicBundle:
    """Context manager: yields a staging folder; on success it replaces `target`."""

    def __init__(self, target: str | Path, overwrite: bool = False) -> None:
        self.target = Path(target).absolute()
        self.overwrite = overwrite
        self.staging = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        if self.target.exists() and not self.overwrite:
            raise ConversionError(f"{self.target} already exists; pass --overwrite to replace it "
                                  "(the old bundle stays until the new one is complete)")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(self.target)
            if self.staging.exists():
                _discard(self.staging)
            self.staging.mkdir()
            (self.staging / STAGING_MARK).write_text(f"{os.getpid()}\n")
        except OSError as exc:
            raise ConversionError(f"cannot write next to {self.target}: {exc.strerror}") from exc
        return self.staging

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            _discard(self.staging)
            return
        try:
            self.staging.chmod(0o755)
            _fsync_tree(self.staging)
            # the bundle itself carries no mark; from here on the sweep knows the staging
            # folder by its manifest (a kill during the fsync above left it marked)
            (self.staging / STAGING_MARK).unlink()
            _fsync_dir(self.staging)
            if self.target.exists() and _exchange(self.staging, self.target):
                # one atomic step: at no instant is there no bundle at `target`
                _discard(self.staging)  # now holds the old bundle
            else:
                old = None
                if self.target.exists():  # no renameat2: a short window without a bundle
                    old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
                    os.rename(self.target, old)
                os.rename(self.staging, self.target)
                if old is not None:
                    _discard(old)
            _fsync_dir(self.target.parent)
        except OSError as err:
            _discard(self.staging)
            raise ConversionError(f"cannot move the bundle into {self.target}: {err}") from err


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or filesystem
        return False
    raise OSError(err, os.strerror(err), str(b))


def _remove_stale(target: Path) -> None:
    """Remove what killed conversions left in `target`'s folder: staging folders of any
    target (`.NAME.partial-PID`) that are ours by `_is_staging` — marked, holding a manifest,
    or empty — and `target`'s own moved-aside old bundle; only when the process PID is
    gone. A user's folder of that name holding other files is never touched."""
    for p in target.parent.glob(".*.partial-*"):
        if _is_staging(p) and _dead(p.name.rpartition("-")[2]):
            _remove(p)
    for p in target.parent.glob(f".{target.name}.old-*"):
        if _is_staging(p) and _dead(p.name.rpartition("-")[2]):
            _remove(p)


def _is_staging(p: Path) -> bool:
    """A folder of ours: marked (while written, and while discarded), holding a manifest (the
    mark is removed just before the rename), or empty (killed before the mark was written)."""
    if not p.is_dir() or p.is_symlink():
        return False
    return ((p / STAGING_MARK).is_file() or (p / N.MANIFEST_FILE).is_file()
            or not any(p.iterdir()))


def _dead(pid: str) -> bool:
    return pid.isdigit() and len(pid) <= 10 and not _alive(int(pid))


def _remove(p: Path) -> None:
    log.warning("removing %s, left by an interrupted conversion", p)
    _discard(p)


def _discard(p: Path) -> None:
    """Delete one of our folders so that a kill at any point leaves it still recognisable
    (marked, or empty) for the next conversion's sweep: mark first, the mark last."""
    mark = p / STAGING_MARK
    try:
        mark.write_text(f"{os.getpid()}\n")
        for f in p.iterdir():
            if f.name == STAGING_MARK:
                continue
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                f.unlink(missing_ok=True)
        mark.unlink(missing_ok=True)
        p.rmdir()
    except OSError:
        shutil.rmtree(p, ignore_errors=True)  # best effort, as before


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o644)  # onnx writes external data 0600; bundles are copied and shared
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_entries(folder: Path, files: list[str]) -> tuple[FileEntry, ...]:
    return tuple(FileEntry(f, (folder / f).stat().st_size, sha256_file(folder / f))
                 for f in files)


def onnx_io(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs of an ONNX graph as manifest tensor specs (graph only, no weights)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)

    def spec(v: "onnx.ValueInfoProto") -> TensorSpec:
        t = v.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
        return TensorSpec(v.name, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), shape)

    inits = {i.name for i in model.graph.initializer}
    return (tuple(spec(v) for v in model.graph.input if v.name not in inits),
            tuple(spec(v) for v in model.graph.output))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    # Round-trip through the runtime's reader: the converter never writes a manifest the
    # runtime would refuse.
    Manifest.from_dict(manifest.to_dict(), where="generated manifest")
    (folder / N.MANIFEST_FILE).write_text(manifest.to_json(), encoding="utf-8")
