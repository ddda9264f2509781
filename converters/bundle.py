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
                shutil.rmtree(self.staging)
            self.staging.mkdir()
            (self.staging / STAGING_MARK).write_text(f"{os.getpid()}\n")
        except OSError as exc:
            raise ConversionError(f"cannot write next to {self.target}: {exc.strerror}") from exc
        return self.staging

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        try:
            self.staging.chmod(0o755)
            (self.staging / STAGING_MARK).unlink()  # the bundle itself carries no mark
            _fsync_tree(self.staging)
            if self.target.exists() and _exchange(self.staging, self.target):
                # one atomic step: at no instant is there no bundle at `target`
                shutil.rmtree(self.staging, ignore_errors=True)  # now holds the old bundle
            else:
                old = None
                if self.target.exists():  # no renameat2: a short window without a bundle
                    old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
                    os.rename(self.target, old)
                os.rename(self.staging, self.target)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(self.target.parent)
        except OSError as exc:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise ConversionError(f"cannot move the bundle into {self.target}: {exc}") from exc


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
    target that carry our mark, and `target`'s own moved-aside old bundle; only when the
    process that made them is gone, and never anything that is not ours."""
    for p in target.parent.glob(".*.partial-*"):
        if (p / STAGING_MARK).is_file() and _dead(p.name.rpartition("-")[2]):
            _remove(p)
    for p in target.parent.glob(f".{target.name}.old-*"):
        if (p / N.MANIFEST_FILE).is_file() and _dead(p.name.rpartition("-")[2]):
            _remove(p)


def _dead(pid: str) -> bool:
    return pid.isdigit() and len(pid) <= 10 and not _alive(int(pid))


def _remove(p: Path) -> None:
    log.warning("removing %s, left by an interrupted conversion", p)
    shutil.rmtree(p, ignore_errors=True)


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
