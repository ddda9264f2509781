"""A folder of fp32 TFLite exports reused across conversions (`edge-convert --export-cache DIR`).

A TFLite conversion traces and lowers each component in fp32 with litert-torch, then quantizes
that file; the trace is nearly all of the time (about 20 s a component for the tests' tiny
models, many minutes for SD 1.5's UNet). Converting one checkpoint to several precisions, or
again after a failed run, reuses every export whose inputs are identical, so each precision
after the first costs only its quantization.

An export is found by a digest of everything that decides it: the component's role, module
class, config and every weight tensor (name, dtype, shape, bytes); the TFLite sizes and the
layout (trace shapes, attention slices); the versions of torch, litert-torch, diffusers and
transformers; and the source of this converter package and of the runtime contracts its
exporters use. Off by default: an SD 1.5 UNet export takes 3.4 GB.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from edge_sdk.errors import ConversionError

log = logging.getLogger(__name__)

_VERSIONED = ("torch", "litert-torch", "ai-edge-quantizer", "diffusers", "transformers")


@lru_cache(maxsize=1)
def _code_digest() -> str:
    """This package's source and the runtime modules its exporters import (names, contracts)."""
    here = Path(__file__).resolve().parent
    runtime = here.parent / "edge_sdk"
    h = hashlib.sha256()
    for path in sorted(here.rglob("*.py")) + [runtime / "contracts.py", runtime / "names.py"]:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def export_key(role: str, model: Any, *facts: object) -> str:
    """The digest that names `model`'s export: role, class, config, weights, `facts` (sizes,
    layout), package versions and converter source."""
    import torch
    h = hashlib.sha256()
    for part in (role, type(model).__module__, type(model).__qualname__,
                 repr(getattr(model, "config", None)), *map(repr, facts),
                 *(f"{d}={_version(d)}" for d in _VERSIONED), _code_digest()):
        h.update(str(part).encode() + b"\0")
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def cached_export(folder: Path, role: str, key: str, make: Callable[[Path], None]) -> Path:
    """The fp32 file for `key` in `folder`, made by `make(path)` on a miss. Written under a
    temporary name and renamed, so a killed run leaves no half file under a real name."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"--export-cache {str(folder)!r} cannot be created "
                              f"({exc.strerror or exc}); give a writable folder") from exc
    path = folder / f"{role}-{key}.tflite"
    if path.is_file():
        log.info("%s: fp32 export reused from %s", role, path)
        os.utime(path)  # recently used: what a pruning of old entries keeps
        return path
    part = folder / f".{path.name}.{os.getpid()}.part"
    try:
        make(part)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path
