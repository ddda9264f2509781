"""A folder of fp32 TFLite exports reused across conversions (`edge-convert --export-cache DIR`).

A TFLite conversion traces and lowers each component in fp32 with litert-torch, then quantizes
that file; the trace is nearly all of the time (about 20 s a component for the tests' tiny
models, many minutes for SD 1.5's UNet). Converting one checkpoint to several precisions, or
again after a failed run, reuses every export whose inputs are identical, so each precision
after the first costs only its quantization.

An export is found by a digest of everything that decides it: the component's role, module
class, config (its public keys: not the path it was loaded from, nor diffusers' record of
defaults, whose order changes from process to process) and every parameter and buffer (name,
dtype, shape, bytes); the TFLite sizes (sized components) and the layout (trace shapes,
attention slices); the versions of torch, diffusers, transformers, litert-torch and every
package litert-torch requires (the lowering, litert-converter and jax among them); and the
source of this converter package and of the runtime contracts its exporters use. Off by
default: an SD 1.5 UNet export takes 3.4 GB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from edge_sdk.errors import ConversionError

log = logging.getLogger(__name__)

_TRACERS = ("torch", "diffusers", "transformers", "litert-torch")


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


@lru_cache(maxsize=1)
def _versions() -> tuple[str, ...]:
    """The tracing packages and everything litert-torch requires, with their versions."""
    names = set(_TRACERS)
    for req in metadata.requires("litert-torch") if _version("litert-torch") != "-" else []:
        names.add(re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0])
    return tuple(f"{n}={_version(n)}" for n in sorted(names))


def _config_text(config: Any) -> str:
    """The config's public keys as sorted JSON ("_name_or_path", "_use_default_values"...
    left out: a path, and a list whose order is a set's)."""
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return json.dumps({k: v for k, v in items.items() if not str(k).startswith("_")},
                      sort_keys=True, default=str)


def export_key(role: str, model: Any, *facts: object) -> str:
    """The digest that names `model`'s export: role, class, config, parameters and buffers,
    `facts` (sizes, layout), package versions and converter source."""
    import torch
    h = hashlib.sha256()
    for part in (role, type(model).__module__, type(model).__qualname__,
                 _config_text(getattr(model, "config", None)), *map(repr, facts),
                 *_versions(), _code_digest()):
        h.update(str(part).encode() + b"\0")
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())  # non-persistent ones too (position ids...)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(tensors[name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def open_cache(folder: str | Path) -> Path:
    """The cache folder, made if missing and checked writable before any trace starts."""
    path = Path(folder)
    if not str(folder).strip():
        raise ConversionError("--export-cache needs a folder (it was empty)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConversionError(f"--export-cache {str(path)!r} cannot be created "
                              f"({exc.strerror or exc}); give a writable folder") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConversionError(f"--export-cache {str(path)!r} is not writable; give a "
                              "writable folder")
    return path


def cached_export(folder: Path, role: str, key: str, make: Callable[[Path], None]) -> Path:
    """The fp32 file for `key` in `folder`, made by `make(path)` on a miss. Written under a
    temporary name of its own and renamed, so neither a killed run nor a second converter
    sharing the folder leaves a half file under a real name."""
    path = folder / f"{role}-{key}.tflite"
    if path.is_file():
        log.info("%s: fp32 export reused from %s", role, path)
        try:
            os.utime(path)  # recently used: what a pruning of old entries keeps
        except OSError:
            pass  # a shared, read-only cache still serves
        return path
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        make(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
