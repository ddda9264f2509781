"""ONNX export of one component, by its kind's exporter (converters.registry) and contract.

Every graph has dynamic batch (and height/width for UNet and VAE), weights stored as external
data next to the graph, so onnxruntime can map them instead of copying.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

from edge_sdk import names as N

from .options import DEFAULT_OPSET
from .quantize import save_graph
from .registry import Exporter, Shapes
from .weight_map import weight_map

log = logging.getLogger(__name__)

# Layers kept fp32 under int4 and static int8: the first and last convolutions (they touch
# the latents directly) and the timestep embedding (small, and every block depends on it).
INT4_KEEP_FP32 = ("/conv_in/", "/conv_out/", "/time_embedding/")


def export_onnx(role: str, exp: Exporter, load: Callable[[], Any], out_dir: Path,
                precision: str, shapes: Shapes, opset: int = DEFAULT_OPSET) -> list[str]:
    """Export the model `load()` returns as `<out_dir>/<role>.onnx` (+ data, + a weight map
    for fp32/fp16) and return the file names written. The torch model lives only while it
    is traced: it is gone before the graph is loaded or quantized (with both resident, an
    SD 1.5 int8 conversion peaked at 14.3 GB RSS; 4.8 GB this way)."""
    mapped = precision in ("fp32", "fp16")  # quantized graphs rename what they rewrite
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{role}-") as tmp:
        src, wmap = trace_fp32(exp, load, Path(tmp), shapes, opset, weight_names=mapped)
        gc.collect()
        files = finish_component(role, src, out_dir, precision)
    if mapped:
        name = role + N.WEIGHT_MAP_SUFFIX
        (out_dir / name).write_text(json.dumps(wmap, indent=0, sort_keys=True))
        files.append(name)
    return files


def trace_fp32(exp: Exporter, load: Callable[[], Any], scratch: Path, shapes: Shapes,
               opset: int = DEFAULT_OPSET, weight_names: bool = True
               ) -> tuple[Path, dict[str, list[Any]]]:
    """Trace the model `load()` returns to an fp32 `<scratch>/model.onnx`; return its path
    and the map from the model's parameter names to the graph's initializers
    (converters.weight_map; empty when `weight_names` is off)."""
    import onnx
    import torch

    contract = exp.contract
    model = load()
    wrapper = exp.wrap(model)
    example = exp.example(model, 1 if contract.kind.startswith("vae") else 2, None, shapes)
    names, outputs = exp.input_names(model), exp.output_names(model)
    args = tuple(example[n] for n in names)
    renamed = pretranspose_linears(wrapper, args)
    axes = {k: v for k, v in contract.dynamic_axes().items() if k in names or k in outputs}
    raw = scratch / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(wrapper, args, str(raw), input_names=names,
                          output_names=outputs, dynamic_axes=axes,
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    graph = onnx.load(str(raw), load_external_data=False)
    _name_output_dims(graph, wrapper, args, axes)
    onnx.save(graph, str(raw))  # external-data references stay as the exporter wrote them
    return raw, weight_map(graph, scratch, model, renamed=renamed) if weight_names else {}


class _MatMulLinear:
    """Built lazily (torch is imported only to convert): a Linear whose weight is stored
    transposed, so the trace is MatMul(x, Wt) + b on the parameter itself."""

    cls: Any = None

    @classmethod
    def of(cls, linear: Any) -> Any:
        if cls.cls is None:
            import torch

            class MatMulLinear(torch.nn.Module):
                def __init__(self, lin: Any) -> None:
                    super().__init__()
                    self.weight_t = torch.nn.Parameter(lin.weight.detach().t().contiguous(),
                                                       requires_grad=False)
                    self.bias = lin.bias

                def forward(self, x: Any) -> Any:
                    y = torch.matmul(x, self.weight_t)
                    return y if self.bias is None else y + self.bias
            cls.cls = MatMulLinear
        return cls.cls(linear)


def pretranspose_linears(wrapper: Any, args: tuple[Any, ...]) -> dict[str, str]:
    """Store the weight of every Linear that sees inputs of 3+ dimensions transposed, one
    at a time, before tracing. The tracer otherwise folds each such weight's transpose into
    an anonymous new constant, made while the parameter is alive (SDXL's int8 conversion
    peaked 0.2 GB lower this way). The graph is the same (MatMul with the transposed
    weight), its initializers named after the parameters; returns {new parameter name: the
    checkpoint's}, for the weight map."""
    import torch
    deep: set[str] = set()
    hooks = [m.register_forward_pre_hook(
        lambda mod, inp, name=name: deep.add(name) if inp[0].dim() > 2 else None)
        for name, m in wrapper.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            wrapper(*args)
    finally:
        for h in hooks:
            h.remove()
    renamed = {}
    for name in sorted(deep):
        parent_name, _, child = name.rpartition(".")
        parent = wrapper.get_submodule(parent_name)
        setattr(parent, child, _MatMulLinear.of(getattr(parent, child)))
        renamed[f"{name}.weight_t".removeprefix("m.")] = f"{name}.weight".removeprefix("m.")
    return renamed


def finish_component(role: str, src: Path, out_dir: Path, precision: str) -> list[str]:
    """The fp32 graph `src` -> `<out_dir>/<role>.onnx` (+ data) at `precision`."""
    import onnx
    if precision in ("int8", "int4"):
        from .quantize import quantize_int4_blockwise, quantize_int8_dynamic
        if precision == "int8":
            return quantize_int8_dynamic(src, out_dir, role)
        return quantize_int4_blockwise(src, out_dir, role, keep=INT4_KEEP_FP32)
    graph = to_fp16_file(src) if precision == "fp16" else \
        onnx.load(str(src), load_external_data=True)
    graph.doc_string = f"edge-sdk {role} ({precision})"
    return save_graph(graph, out_dir, role)


def _name_output_dims(graph: Any, wrapper: Any, args: tuple[Any, ...],
                      axes: dict[str, dict[int, str]]) -> None:
    """The tracer invents names for output dims it cannot prove static (e.g. CLIP's sequence
    length). Give them the value they have, unless the dim is one of our dynamic axes."""
    import torch
    with torch.no_grad():
        outs = wrapper(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for value, tensor in zip(graph.graph.output, outs):
        dynamic = axes.get(value.name, {})
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i in dynamic:
                dim.dim_param = dynamic[i]
            elif dim.dim_param:
                dim.dim_value = int(tensor.shape[i])


def to_fp16_file(src: Path) -> Any:
    """The fp32 graph file `src` (external data beside it) as an fp16 graph, like to_fp16.
    Its shapes are inferred from the file: inferring them in memory serializes the whole
    model, which protobuf refuses above 2 GB (SD 1.5's fp32 UNet: "Failed to serialize
    proto")."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    inferred = src.with_name(src.stem + ".shapes.onnx")
    onnx.shape_inference.infer_shapes_path(str(src), str(inferred))
    try:
        graph = onnx.load(str(inferred), load_external_data=True)
    finally:
        inferred.unlink(missing_ok=True)
    fp16 = convert_float_to_float16(graph, keep_io_types=True, disable_shape_infer=True,
                                    node_block_list=_fp32_nodes(graph))
    _drop_cast_pairs(fp16)
    return fp16


# Sinusoidal embeddings kept fp32 in fp16 graphs, from the graph inputs on: their arguments
# reach the timestep (999) and SDXL's sizes (1024 and more), where fp16's step is 0.5-1 rad
FP32_SCOPES = ("/time_proj/", "/add_time_proj/")
FP32_INPUTS = ("timestep", "time_ids")  # edge_sdk.contracts.UnetIO's names
_MAX_FEEDERS = 16  # nodes between those inputs and the embeddings (Expand, a Reshape ...)


def _fp32_nodes(graph: Any) -> list[str]:
    """The embeddings' nodes and those that carry the timestep and time ids to them."""
    scoped = {n.name for n in graph.graph.node if any(s in n.name for s in FP32_SCOPES)}
    consumers: dict[str, list[Any]] = {}
    for n in graph.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    feeders: set[str] = set()
    frontier = [i.name for i in graph.graph.input if i.name in FP32_INPUTS] if scoped else []
    while frontier and len(feeders) <= _MAX_FEEDERS:
        for n in consumers.get(frontier.pop(), []):
            if n.name not in scoped and n.name not in feeders:
                feeders.add(n.name)
                frontier.extend(n.output)
    if len(feeders) > _MAX_FEEDERS:  # the inputs reach further: only the embeddings
        feeders = set()
    return sorted(scoped | feeders)


def _drop_cast_pairs(model: Any) -> None:
    """The converter casts a kept-fp32 node's output to fp16 and back to fp32 for the next
    kept one (rounding it on the way): the consumers of each such Cast(fp16) -> Cast(fp32)
    pair read the fp32 tensor itself; a cast left without consumers is removed."""
    from onnx import TensorProto
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    outputs = {o.name for o in model.graph.output}

    def cast_to(n: Any, dtype: int) -> bool:
        return n.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in n.attribute)
    rename = {}
    for n in nodes:
        first = producer.get(n.input[0]) if n.input else None
        if cast_to(n, TensorProto.FLOAT) and first is not None \
                and cast_to(first, TensorProto.FLOAT16) and n.output[0] not in outputs:
            rename[n.output[0]] = first.input[0]
    for n in nodes:
        for k, name in enumerate(n.input):
            if name in rename:
                n.input[k] = rename[name]
    used = {i for n in model.graph.node for i in n.input} | outputs
    for n in nodes:
        if n.op_type == "Cast" and n.output[0] not in used:
            model.graph.node.remove(n)


def to_fp16(graph: Any) -> Any:
    """fp16 weights and compute with fp32 inputs/outputs (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    # Resize's scales and the ops that must stay fp32 on CPU are handled by the converter's
    # default block list; keep_io_types leaves the graph's interface unchanged.
    return convert_float_to_float16(graph, keep_io_types=True, disable_shape_infer=False)
