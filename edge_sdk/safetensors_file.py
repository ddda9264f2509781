"""Reading `.safetensors` files with numpy alone (LoRAs, embeddings), mapped, not copied.

The format: an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the bytes. Everything is checked against the file's size before a
byte is read, so a truncated or damaged file is a typed error naming it, never a crash.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SafetensorsError

# safetensors dtype names -> numpy; bf16 is widened to float32 (numpy has no bfloat16)
DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER = 100 << 20  # the format's own limit


def read_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The tensor entries of the file's header (metadata left out) and where data begins."""
    path = Path(path)
    header, start, size = _raw_header(path)
    header.pop("__metadata__", None)
    for name, entry in header.items():
        _check_entry(path, name, entry, size - start)
    return header, start


def read_metadata(path: str | Path) -> dict[str, str]:
    """The header's `__metadata__` (free-form strings; empty when there is none)."""
    meta = _raw_header(Path(path))[0].get("__metadata__")
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _raw_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The header as JSON, where data begins and the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(MAX_HEADER, size - 8):
                raise SafetensorsError(
                    f"{path}: not a .safetensors file, or truncated (its header claims "
                    f"{n} bytes of {size}); download it again")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise SafetensorsError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: the .safetensors header is not valid JSON ({exc}); "
                               "the file is damaged, download it again") from exc
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the .safetensors header is not a JSON object")
    return header, 8 + n, size


def _check_entry(path: Path, name: str, entry: Any, room: int) -> None:
    ok = isinstance(entry, dict) and isinstance(entry.get("shape"), list) \
        and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
    if not ok:
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry")
    dtype = entry.get("dtype")
    if dtype not in DTYPES and dtype != "BF16":
        raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype!r}; supported: "
                               f"{sorted(DTYPES) + ['BF16']}")
    begin, end = entry["data_offsets"]
    width = 2 if dtype == "BF16" else np.dtype(DTYPES[dtype]).itemsize
    count = int(np.prod(entry["shape"], dtype=np.int64))
    if not (0 <= begin <= end <= room and end - begin == count * width):
        raise SafetensorsError(f"{path}: tensor {name!r} lies outside the file or has the "
                               "wrong size: the file is truncated or damaged; download it "
                               "again")


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the file, memory-mapped read-only (bf16: widened, so copied)."""
    header, start = read_header(path)
    if not header:
        return {}
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        data = raw[start + begin:start + end]
        if e["dtype"] == "BF16":
            arr = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = data.view(DTYPES[e["dtype"]])
        out[name] = arr.reshape(e["shape"])
    return out
