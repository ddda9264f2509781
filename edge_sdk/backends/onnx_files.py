"""Inspect an .onnx file without the `onnx` package: which external-data files it reads,
and where each weight is stored (a load-time LoRA changes them).

A model file names its weight files itself (TensorProto.external_data "location"), so a
crafted file could make onnxruntime read `../../etc/passwd` or follow a symlink out of the
bundle. The runtime checks every location before creating a session.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from ..errors import BundleError

# protobuf field numbers (onnx.proto3)
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, bytes | None]]:
    """(field number, payload) for each field; payload only for length-delimited ones."""
    for field, value in _fields_with_ints(buf):
        yield field, value if isinstance(value, bytes) else None


def _tensor_locations(tensor: bytes) -> Iterator[str]:
    for field, payload in _fields(tensor):
        if field == _TENSOR_EXTERNAL_DATA and payload is not None:
            entry = {f: v for f, v in _fields(payload) if v is not None}
            if entry.get(_ENTRY_KEY) == b"location":
                yield entry.get(_ENTRY_VALUE, b"").decode("utf-8", "replace")


def _graph_locations(graph: bytes, depth: int = 0) -> Iterator[str]:
    if depth > 16:
        raise ValueError("graph nesting too deep")
    for field, payload in _fields(graph):
        if payload is None:
            continue
        if field == _GRAPH_INITIALIZER:
            yield from _tensor_locations(payload)
        elif field == _GRAPH_SPARSE_INITIALIZER:
            for f, p in _fields(payload):
                if f in (_SPARSE_VALUES, _SPARSE_INDICES) and p is not None:
                    yield from _tensor_locations(p)
        elif field == _GRAPH_NODE:
            for f, attr in _fields(payload):
                if f != _NODE_ATTRIBUTE or attr is None:
                    continue
                for af, ap in _fields(attr):
                    if af in (_ATTR_T, _ATTR_TENSORS) and ap is not None:
                        yield from _tensor_locations(ap)
                    elif af in (_ATTR_G, _ATTR_GRAPHS) and ap is not None:
                        yield from _graph_locations(ap, depth + 1)


def external_data_locations(path: Path) -> set[str]:
    """Every external-data location the model file refers to."""
    data = path.read_bytes()
    try:
        return {loc for field, graph in _fields(data) if field == _MODEL_GRAPH and graph
                for loc in _graph_locations(graph)}
    except ValueError as exc:
        raise BundleError(f"{path}: not a valid ONNX file ({exc}); re-convert or copy the "
                          "bundle again") from exc


def check_external_data(path: Path, allowed: set[str]) -> None:
    """Refuse external data outside the bundle folder, behind symlinks, or not listed among
    the component's files in the manifest (which are size- and sha256-checked)."""
    root = path.parent.resolve()
    for loc in external_data_locations(path):
        p = PurePosixPath(loc.replace("\\", "/"))
        target = (path.parent / loc)
        if (p.is_absolute() or ".." in p.parts or loc not in allowed or target.is_symlink()
                or not target.resolve().is_relative_to(root)):
            raise BundleError(f"{path}: external data location {loc!r} points outside the "
                              "bundle or to a file the manifest does not list; refusing to "
                              "load it (the model file may have been tampered with)")


# TensorProto fields and the data types a weight may have
_T_DIMS, _T_DATA_TYPE, _T_NAME, _T_RAW = 1, 2, 8, 9
_T_EXTERNAL, _T_LOCATION = 13, 14
ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64}


@dataclass(frozen=True)
class Initializer:
    """Where a graph's weight lives: a byte range of an external-data file, or its bytes."""

    name: str
    dtype: Any  # numpy dtype
    shape: tuple[int, ...]
    location: str | None = None  # external data file, relative to the graph
    offset: int = 0
    length: int = 0
    raw: bytes | None = None  # embedded raw_data

    def read(self, folder: Path) -> np.ndarray:
        """The weight's values (external data memory-mapped, read-only)."""
        if self.raw is not None:
            return np.frombuffer(self.raw, dtype=self.dtype).reshape(self.shape)
        data = np.memmap(folder / str(self.location), dtype=np.uint8, mode="r",
                         offset=self.offset, shape=(self.length,))
        return data.view(self.dtype).reshape(self.shape)


def _fields_with_ints(buf: bytes) -> Iterator[tuple[int, int | bytes | None]]:
    """(field number, value) for each field: the payload of a length-delimited one, the
    value of a varint (dims and data types are varints), None for fixed-width ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            yield field, buf[pos:pos + n]
            pos += n
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            yield field, None
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _packed(payload: bytes) -> list[int]:
    out, pos = [], 0
    while pos < len(payload):
        value, pos = _varint(payload, pos)
        out.append(value)
    return out


def _initializer(tensor: bytes) -> Initializer | None:
    dims: list[int] = []
    fields: dict[str, Any] = {}
    for f, v in _fields_with_ints(tensor):
        if f == _T_DIMS:
            dims += _packed(v) if isinstance(v, bytes) else [v]
        elif f == _T_DATA_TYPE:
            fields["dtype"] = v
        elif f == _T_NAME and isinstance(v, bytes):
            fields["name"] = v.decode("utf-8", "replace")
        elif f == _T_RAW and isinstance(v, bytes):
            fields["raw"] = v
        elif f == _T_EXTERNAL and isinstance(v, bytes):
            entry = {k: w for k, w in _fields_with_ints(v) if isinstance(w, bytes)}
            key = entry.get(_ENTRY_KEY, b"").decode()
            fields[key] = entry.get(_ENTRY_VALUE, b"").decode("utf-8", "replace")
    if fields.get("dtype") not in ONNX_DTYPES or "name" not in fields:
        return None
    dtype = np.dtype(ONNX_DTYPES[fields["dtype"]])
    if "location" in fields:
        return Initializer(fields["name"], dtype, tuple(dims), fields["location"],
                           int(fields.get("offset", 0)), int(fields.get("length", 0)))
    if "raw" in fields:
        return Initializer(fields["name"], dtype, tuple(dims), raw=fields["raw"])
    return None


def float_initializers(path: Path) -> dict[str, Initializer]:
    """The graph's floating-point initializers (weights) by name, where they are stored."""
    data = path.read_bytes()
    out = {}
    try:
        for field, graph in _fields(data):
            if field != _MODEL_GRAPH or not graph:
                continue
            for f, payload in _fields(graph):
                if f == _GRAPH_INITIALIZER and payload is not None:
                    init = _initializer(payload)
                    if init is not None:
                        out[init.name] = init
    except ValueError as exc:
        raise BundleError(f"{path}: not a valid ONNX file ({exc}); re-convert or copy the "
                          "bundle again") from exc
    return out
