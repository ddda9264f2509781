"""An fp32 ONNX graph made ready for an NPU compiler: static shapes, folded, NPU-friendly ops.

NPU compilers (Qualcomm's QNN HTP, measured with onnxruntime-qnn 2.7) take a graph only
when every shape is known: with our dynamic axes, the Shape/Gather/Concat arithmetic that
reshapes attention heads stayed on the CPU. Fixing the input shapes and folding the graph
with onnxruntime's basic (hardware-independent) optimizations removes that arithmetic; the
HTP then rejected only the two Einsums of the attention pooling of text-conditioned UNets
(`addition_embed_type: text`, as in our shipped model), which become MatMuls here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)


def make_static(src: Path, dst: Path, dims: Mapping[str, int]) -> Path:
    """`src` with its named dynamic dimensions set (`dims`: e.g. batch=1, height=8,
    width=8, sequence=77), folded by onnxruntime's basic optimizations and its Einsums
    rewritten as MatMuls; written to `dst` (+ `dst`.data). Returns `dst`. The weights are
    never loaded by this code (only by onnxruntime's folding): an SD 1.5 UNet is 3.4 GB."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    model = onnx.load(str(src), load_external_data=False)
    for name, value in dims.items():
        make_dim_param_fixed(model.graph, name, int(value))
    left = [(i.name, d.dim_param) for i in list(model.graph.input) + list(model.graph.output)
            for d in i.type.tensor_type.shape.dim if d.dim_param]
    if left:
        raise ValueError(f"{src.name}: dimensions {left} were not given a size")
    fixed = src.with_name(src.stem + ".static.onnx")  # beside src: its weights stay shared
    onnx.save(model, str(fixed))
    del model
    try:
        _fold(fixed, dst)
    finally:
        fixed.unlink(missing_ok=True)
    model = onnx.load(str(dst), load_external_data=False)
    if rewrite_einsums(model.graph):
        onnx.save(model, str(dst))  # the weights' references to dst's data file unchanged
    del model
    _fuse_for_qnn(dst)
    return dst


# onnxruntime's metadata key for "shape inference was run by ..."
INFER_MARK = "onnx.infer"


def _fuse_for_qnn(path: Path) -> None:
    """onnxruntime's QNN preprocessing: the exporter's Erf sequence of GELU (no Erf on the
    HTP) fused into one Gelu, ReduceMean sequences into LayerNormalization."""
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model
    tmp = path.with_name(path.stem + ".qnn.onnx")
    if qnn_preprocess_model(str(path), str(tmp), fuse_layernorm=True,
                            save_as_external_data=True, all_tensors_to_one_file=True,
                            external_data_location=tmp.name + ".data"):
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        os.replace(tmp.with_name(tmp.name + ".data"), path.with_name(path.name + ".data"))
        import onnx
        model = onnx.load(str(tmp), load_external_data=False)
        for t in model.graph.initializer:  # the data file now has the graph's name
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = path.name + ".data"
        # its "onnx.infer" mark makes onnxruntime's quantizer take the graph for one without
        # shape inference and infer it on a second copy of the weights: SD 1.5's
        # quantization peaked at 10.1 GB with it, 4.5 GB without
        kept = [p for p in model.metadata_props if p.key != INFER_MARK]
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
        onnx.save(model, str(path))
        tmp.unlink()


def _fold(src: Path, dst: Path) -> None:
    """onnxruntime's basic optimizations (constant folding, redundant nodes: no
    hardware-specific fusions) applied offline and saved."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                dst.name + ".data")
    so.add_session_config_entry(
        "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    so.log_severity_level = 3
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])


def rewrite_einsums(graph: object) -> int:
    """Every two-operand batched-matmul Einsum of `graph` (one batch letter, one summed
    letter, one free letter per operand: "bct,bcs->bts") as Transpose, MatMul, Transpose.
    Returns how many were rewritten; other Einsums are left as they are."""
    from onnx import helper
    out, count = [], 0
    for node in graph.node:  # type: ignore[attr-defined]
        letters = _matmul_letters(node)
        if letters is None:
            out.append(node)
            continue
        a, b, o, (bt, k, m, n) = letters
        base = node.name or node.output[0]
        ta, tb, mm = base + "/a_t", base + "/b_t", base + "/matmul"
        out += [helper.make_node("Transpose", [node.input[0]], [ta], name=ta,
                                 perm=[a.index(c) for c in (bt, m, k)]),
                helper.make_node("Transpose", [node.input[1]], [tb], name=tb,
                                 perm=[b.index(c) for c in (bt, k, n)]),
                helper.make_node("MatMul", [ta, tb], [mm], name=mm),
                helper.make_node("Transpose", [mm], [node.output[0]], name=base + "/out_t",
                                 perm=[(bt + m + n).index(c) for c in o])]
        count += 1
    if count:
        del graph.node[:]  # type: ignore[attr-defined]
        graph.node.extend(out)  # type: ignore[attr-defined]
        log.info("rewrote %d Einsum(s) as MatMul", count)
    return count


def _matmul_letters(node: object) -> tuple[str, str, str, tuple[str, str, str, str]] | None:
    """(a, b, out, (batch, summed, a's free, b's free)) of a batched-matmul Einsum."""
    if getattr(node, "op_type", "") != "Einsum" or len(node.input) != 2:  # type: ignore
        return None
    eq = next((x.s.decode() for x in node.attribute if x.name == "equation"), "")  # type: ignore
    eq = eq.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    ins, o = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if not (len(a) == len(b) == len(o) == 3 and len(set(a)) == len(set(b)) == 3):
        return None
    batch = [c for c in a if c in b and c in o]
    summed = [c for c in a if c in b and c not in o]
    free_a = [c for c in a if c not in b and c in o]
    free_b = [c for c in b if c not in a and c in o]
    if not (len(batch) == len(summed) == len(free_a) == len(free_b) == 1):
        return None
    return a, b, o, (batch[0], summed[0], free_a[0], free_b[0])


def with_opset(src: Path, opset: int) -> Path:
    """`src` converted to `opset` (16-bit QDQ needs 21) by onnx's version converter, beside it
    with its weights' file shared: the converter serializes the whole model, which fails
    above protobuf's 2 GB with the weights loaded (SD 1.5's UNet is 3.4 GB), so it is run
    on the graph without them. `src` itself when it is at `opset` or newer."""
    import onnx
    model = onnx.load(str(src), load_external_data=False)
    have = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if have >= opset:
        return src
    model = onnx.version_converter.convert_version(model, opset)
    dst = src.with_name(f"{src.stem}.opset{opset}.onnx")
    onnx.save(model, str(dst))
    return dst
