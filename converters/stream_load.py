"""A diffusers model read from its folder one tensor at a time, in fp32.

`from_pretrained` maps each .safetensors file and copies every tensor out of the mapping
(cast to fp32 when the file is fp16), so the file's pages and the fp32 model are resident
together: loading SDXL's UNet from an fp16 folder peaked at 15 GB (5 GB of mapped file +
10 GB of weights). Here the model is built on the meta device and each tensor is read with
plain file reads (page cache, not the process's memory), cast and put in place: the peak is
the fp32 model plus one tensor. Used only where the file's tensors are exactly the model's
(names and shapes); anything else (older attention names, variant files, pickles) goes
through `from_pretrained`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

from edge_sdk.errors import ConversionError, SafetensorsError
from edge_sdk.safetensors_file import read_header

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name (sharded: + index)
INDEX = WEIGHTS + ".index.json"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files `from_pretrained` would read (no variant): one file, or the
    shards its index names; empty when there are none."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"]
                                .values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return []
        files = [folder / s for s in shards]
        return files if all(f.is_file() for f in files) else []
    return []


def load_streamed(cls: Any, folder: Path) -> Any | None:
    """`cls` (a diffusers ModelMixin) with the folder's weights in fp32, or None when the
    files are not exactly the model's tensors (the caller then uses from_pretrained)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    files = weight_files(folder)
    if not files:
        return None
    dtypes = torch_dtypes()
    try:
        headers = [(f, *read_header(f)) for f in files]
    except SafetensorsError:
        return None
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(cls.load_config(folder))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(e["shape"]) for _, h, _ in headers for k, e in h.items()}
    if found != expected or any(e["dtype"] not in dtypes for _, h, _ in headers
                                for e in h.values()):
        log.info("%s: its tensors are not the model's as built; loading it whole with "
                 "from_pretrained (more memory)", folder)
        return None
    try:
        for path, header, start in headers:
            for name, t in read_tensors(path, header, start, list(header)):
                set_module_tensor_to_device(model, name, "cpu",
                                            value=t.to(torch.float32)
                                            if t.is_floating_point() else t)
    except SafetensorsError as exc:
        raise ConversionError(f"cannot load {folder}: {exc}") from exc
    return model.eval()


def torch_dtypes() -> dict[str, Any]:
    """The safetensors dtypes read here, as torch's."""
    import torch
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def read_tensors(path: Path, header: dict[str, Any], start: int, names: list[str]
                 ) -> Iterator[tuple[str, Any]]:
    """Each named tensor of a .safetensors file (its header and data start from
    edge_sdk.safetensors_file.read_header), read with plain file reads into memory of its
    own: no mapping of the file stays resident beside the copies."""
    import torch
    dtypes = torch_dtypes()
    with open(path, "rb") as f:
        for name in names:
            e = header[name]
            begin, end = e["data_offsets"]
            buf = bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise SafetensorsError(f"{path}: tensor {name} is cut short (the file is "
                                       "truncated)")
            yield name, torch.frombuffer(buf, dtype=dtypes[e["dtype"]]).reshape(e["shape"]) \
                if buf else torch.empty(e["shape"], dtype=dtypes[e["dtype"]])
