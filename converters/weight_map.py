"""The map from a torch model's parameter names to the initializers of its traced graph.

The exporter keeps a parameter's name when it feeds the graph as is (`m.conv_in.weight`), but
folds the transposed weight of every Linear into an anonymous `onnx::MatMul_1234`. Applying a
LoRA to a converted bundle needs to find those: each parameter is matched by name first, then
by value (its bytes, or its transpose's, equal to exactly one initializer's). The result,
written beside the graph as `<role>.weights.json`, is {parameter: [initializer, transposed]}.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.shape).encode() + str(a.dtype).encode() + a.tobytes()
                          ).hexdigest()


def weight_map(graph: Any, base_dir: Path, model: Any, prefix: str = "m.",
               renamed: dict[str, str] | None = None) -> dict[str, list[Any]]:
    """{parameter name: [initializer name, transposed]} for every parameter of `model`
    found in `graph` (initializers read one at a time from `base_dir`'s external data).
    `renamed`: parameters stored transposed for the export (export_onnx's
    pretranspose_linears), {their name: the checkpoint's}."""
    renamed = renamed or {}
    from onnx import numpy_helper
    inits = {i.name: i for i in graph.graph.initializer}
    out: dict[str, list[Any]] = {}
    pending: dict[str, tuple[str, bool]] = {}  # digest -> (parameter, transposed)
    ambiguous: set[str] = set()
    for name, p in model.named_parameters():
        if prefix + name in inits:
            out[renamed.get(name, name)] = [prefix + name, name in renamed]
            continue
        w = p.detach().float().numpy()
        for transposed, arr in ((False, w), (True, w.T)) if w.ndim == 2 else ((False, w),):
            key = _digest(arr)
            if key in pending:
                ambiguous.add(key)
            pending[key] = (name, transposed)
    taken = {v[0] for v in out.values()}
    for init_name, init in inits.items():
        if init_name in taken or len(init.dims) == 0:
            continue
        key = _digest(numpy_helper.to_array(init, base_dir=str(base_dir)))
        if key in pending and key not in ambiguous:
            name, transposed = pending[key]
            # a renamed parameter is the checkpoint's weight transposed
            out.setdefault(renamed.get(name, name), [init_name, transposed != (name in renamed)])
    missing = sum(1 for n, _ in model.named_parameters() if renamed.get(n, n) not in out)
    log.debug("weight map: %d parameters mapped, %d not found (folded away or ambiguous)",
              len(out), missing)
    return out
