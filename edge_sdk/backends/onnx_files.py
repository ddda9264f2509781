"""Inspect an .onnx file without the `onnx` package: which external-data files it reads.

A model file names its weight files itself (TensorProto.external_data "location"), so a
crafted file could make onnxruntime read `../../etc/passwd` or follow a symlink out of the
bundle. The runtime checks every location before creating a session.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Iterator

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
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield field, None
        elif wire == 1:
            pos += 8
            yield field, None
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            yield field, buf[pos:pos + n]
            pos += n
        elif wire == 5:
            pos += 4
            yield field, None
        else:
            raise ValueError(f"unsupported wire type {wire}")


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
