"""Weight quantization of exported ONNX components.

int8: dynamic quantization of Conv and MatMul/Gemm weights (uint8 weights, activations
quantized at run time: ConvInteger / MatMulInteger), so both the ~69 % of an SD UNet's
parameters that sit in Conv layers and the ~31 % in MatMul/Gemm shrink 4x; embedding tables
(Gather) as int8 rows with a scale each.

int4: block-wise symmetric 4-bit weights for Conv, MatMul and Gemm behind opset-21
DequantizeLinear (MatMul-only int4 would shrink an SD UNet by at most ~28 %).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


def quantize_int8_dynamic(graph: Path, out_dir: Path, name: str) -> list[str]:
    """Dynamic int8: the weights of Conv, MatMul and Gemm as uint8 (per tensor, asymmetric),
    activations quantized at run time (DynamicQuantizeLinear -> ConvInteger/MatMulInteger ->
    Cast -> Mul by the two scales, the pattern onnxruntime's own dynamic quantizer writes and
    fuses into DynamicQuantizeMatMul). Done here, weight by weight, because ORT's
    quantize_dynamic holds three copies of the model: 10.5 GB peak RSS for an SD 1.5 UNet.
    Each weight is read from the fp32 graph's external data as it is quantized and the
    weights left float are read at the end, so the fp32 weights are never all in memory
    (SDXL's UNet: 10.3 GB of them)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=False)
    base = str(graph.parent)
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            users[i] = users.get(i, 0) + 1
    nodes: list[Any] = []
    quantized: set[str] = set()  # activations already passed through DynamicQuantizeLinear
    done = 0
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is not None and _embedding_rewritable(node, table, users):
            nodes.extend(_int8_embedding(model, node, table, base))
            done += 1
            continue
        w_name = node.input[1] if len(node.input) > 1 else None
        t = inits.get(w_name) if w_name else None
        if t is None or t.data_type != onnx.TensorProto.FLOAT or users[w_name] != 1 \
                or not _int8_rewritable(node, t):
            nodes.append(node)
            continue
        w = numpy_helper.to_array(t, base_dir=base)
        if node.op_type == "Gemm" and _attr(node, "transB", 0):
            w = w.T
        q, scale, zp = uint8_per_tensor(w)
        t.CopyFrom(numpy_helper.from_array(q, f"{w_name}_quantized"))
        model.graph.initializer.extend([numpy_helper.from_array(scale, f"{w_name}_scale"),
                                        numpy_helper.from_array(zp, f"{w_name}_zero_point")])
        bias = None
        if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if node.op_type == "Conv":  # [C] -> [C, 1, 1] to broadcast over H, W
                b = numpy_helper.to_array(inits[bias], base_dir=base).reshape(-1, 1, 1)
                model.graph.initializer.append(numpy_helper.from_array(b, f"{bias}_reshaped"))
                bias = f"{bias}_reshaped"
        nodes.extend(_int8_nodes(node, w_name, bias, quantized))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.load_external_data_for_model(model, base)  # the weights left float
    log.info("%s: %d weights to int8 (dynamic)", name, done)
    return save_graph(model, out_dir, name)


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _int8_rewritable(node: Any, t: Any) -> bool:
    if node.op_type == "Conv":
        return True
    if node.op_type == "MatMul":
        return len(t.dims) == 2
    if node.op_type == "Gemm":  # plain x @ B (+ C) only
        return (len(t.dims) == 2 and not _attr(node, "transA", 0)
                and _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0)
    return False


def _embedding_rewritable(node: Any, t: Any, users: dict[str, int]) -> bool:
    """A Gather from a float 2-D table along its rows (a token embedding), used only there."""
    import onnx
    return (t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2
            and users[node.input[0]] == 1 and _attr(node, "axis", 0) == 0)


def _int8_embedding(model: Any, node: Any, t: Any, base: str = "") -> list[Any]:
    """An embedding table as int8 codes with one scale per row (symmetric): the rows are
    gathered as codes and scaled after, so the table shrinks 4x (SD 1.5's text encoder:
    49,408 x 768 floats, 152 MB, the one large tensor that is not a MatMul weight)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.to_array(t, base_dir=base)
    scale = np.abs(w).max(axis=1, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    name, ids, out = t.name, node.input[1], node.output[0]
    t.CopyFrom(numpy_helper.from_array(codes, f"{name}_quantized"))
    model.graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32),
                                                           f"{name}_row_scale"))
    base = node.name or out
    return [helper.make_node("Gather", [f"{name}_quantized", ids], [f"{out}_codes"],
                             name=f"{base}_codes", axis=0),
            helper.make_node("Gather", [f"{name}_row_scale", ids], [f"{out}_scales"],
                             name=f"{base}_scales", axis=0),
            helper.make_node("Cast", [f"{out}_codes"], [f"{out}_float"], name=f"{base}_cast",
                             to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}_float", f"{out}_scales"], [out],
                             name=f"{base}_dequantize")]


def uint8_per_tensor(w: "np.ndarray") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """Asymmetric uint8 codes over [min(w, 0), max(w, 0)], as onnxruntime's QUInt8 weights:
    (codes, scale, zero point), with w ~ (codes - zero point) * scale."""
    import numpy as np
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    q = np.clip(np.rint(w / scale) + zp, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(q), np.array(scale, np.float32), np.array(zp, np.uint8)


def _int8_nodes(node: Any, w_name: str, bias: str | None, quantized: set[str]) -> list[Any]:
    """The dynamic-quantization replacement of one Conv/MatMul/Gemm, same output name."""
    from onnx import TensorProto, helper
    x, out, base = node.input[0], node.output[0], node.name or node.output[0]
    made = []
    if x not in quantized:
        quantized.add(x)
        made.append(helper.make_node("DynamicQuantizeLinear", [x],
                                     [f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"],
                                     name=f"{x}_QuantizeLinear"))
    ins = [f"{x}_quantized", f"{w_name}_quantized", f"{x}_zero_point", f"{w_name}_zero_point"]
    if node.op_type == "Conv":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        made.append(helper.make_node("ConvInteger", ins, [f"{out}_int32"], name=f"{base}_quant",
                                     **attrs))
    else:
        made.append(helper.make_node("MatMulInteger", ins, [f"{out}_int32"],
                                     name=f"{base}_quant"))
    scaled = out if bias is None else f"{out}_scaled"
    made += [
        helper.make_node("Mul", [f"{x}_scale", f"{w_name}_scale"], [f"{base}_scales_mul"],
                         name=f"{base}_quant_scales_mul"),
        helper.make_node("Cast", [f"{out}_int32"], [f"{out}_float"], name=f"{base}_cast",
                         to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{out}_float", f"{base}_scales_mul"], [scaled],
                         name=f"{base}_scale")]
    if bias is not None:
        made.append(helper.make_node("Add", [scaled, bias], [out], name=f"{base}_bias"))
    return made


def run_ort_quantizer(quantize: Callable[[str], None], out_dir: Path) -> Any:
    """Run one of onnxruntime's quantizers into a scratch file beside the bundle being
    written; return the loaded result (weights in memory)."""
    import onnx
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizers log a "run pre-processing" hint to root
    try:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".quantize-") as tmp:
            raw = str(Path(tmp) / "q.onnx")
            quantize(raw)
            return onnx.load(raw, load_external_data=True)
    finally:
        root.setLevel(level)


def save_graph(model: "object", out_dir: Path, name: str) -> list[str]:
    """Save with the bundle's layout: `<name>.onnx` + one `<name>.onnx.data` file."""
    import onnx
    graph_file, data_file = f"{name}.onnx", f"{name}.onnx.data"
    onnx.save_model(model, str(out_dir / graph_file), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data_file, size_threshold=1024)
    return [graph_file] + ([data_file] if (out_dir / data_file).exists() else [])


# int4 ---------------------------------------------------------------------------------
# Which input of each op holds the weight, and the axis blocks run along: the reduction
# (input-channel) axis, as ORT's DequantizeLinear->MatMul => MatMulNBits fusion expects.
_INT4_WEIGHT_AXIS = {"Conv": 1, "MatMul": 0, "Gemm": None}
INT4_OPSET = 21  # block-wise DequantizeLinear and the INT4 type arrived in opset 21
INT4_MIN_ELEMENTS = 4096  # smaller weights (norms, tiny convs) stay fp32: no size to win


def quantize_int4_blockwise(graph: Path, out_dir: Path, name: str, block_size: int = 64,
                            keep: tuple[str, ...] = ()) -> list[str]:
    """Block-wise symmetric 4-bit weights for Conv, MatMul and Gemm, each stored as an INT4
    initializer plus one fp32 scale per `block_size` input channels, feeding a standard
    opset-21 `DequantizeLinear` (so ORT keeps them 4-bit at rest; it fuses MatMul ones into
    MatMulNBits). Nodes whose name contains any string of `keep` stay fp32. As for int8,
    each weight is read from the fp32 graph's external data when it is quantized."""
    import onnx
    from onnx import numpy_helper, version_converter

    model = onnx.load(str(graph), load_external_data=False)
    # convert the opset on the weight-less graph: the protobuf stays far below 2 GB
    model = version_converter.convert_version(model, INT4_OPSET)
    base = str(graph.parent)
    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    nodes, done = [], 0
    for node in model.graph.node:
        w_name = _int4_candidate(node, inits, users, keep)
        if w_name is not None:
            w = numpy_helper.to_array(inits[w_name], base_dir=base)
            axis = _int4_axis(node)
            q, scale = blockwise_int4(w, axis, block_size)
            inits[w_name].CopyFrom(_int4_tensor(f"{w_name}_int4", q))
            s_t = numpy_helper.from_array(scale, f"{w_name}_scale")
            model.graph.initializer.append(s_t)
            nodes.append(onnx.helper.make_node(
                "DequantizeLinear", [f"{w_name}_int4", s_t.name], [f"{w_name}_dq"],
                name=f"{node.name}_dq", axis=axis, block_size=block_size))
            node.input[1] = f"{w_name}_dq"
            done += 1
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.load_external_data_for_model(model, base)  # the weights left float
    log.info("%s: %d weights to int4 (block %d)", name, done, block_size)
    return save_graph(model, out_dir, name)


def _int4_axis(node: Any) -> int:
    axis = _INT4_WEIGHT_AXIS[node.op_type]
    if axis is None:  # Gemm: B is [K, N], or [N, K] when transB
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        axis = 1 if trans_b else 0
    return axis


def _int4_candidate(node: Any, inits: dict[str, Any], users: dict[str, list[Any]],
                    keep: tuple[str, ...]) -> str | None:
    if node.op_type not in _INT4_WEIGHT_AXIS or len(node.input) < 2:
        return None
    w_name = node.input[1]
    t = inits.get(w_name)
    if t is None or t.data_type != 1 or any(k in node.name for k in keep):  # 1: FLOAT
        return None
    n = 1
    for d in t.dims:
        n *= d
    if n < INT4_MIN_ELEMENTS or len(users.get(w_name, [])) != 1:
        return None
    if node.op_type == "MatMul" and len(t.dims) != 2:
        return None
    return w_name


def blockwise_int4(w: "np.ndarray", axis: int, block_size: int) -> tuple["np.ndarray",
                                                                        "np.ndarray"]:
    """Symmetric int4 codes in [-7, 7] and fp32 scales, one per `block_size` run along
    `axis` (the last block may be short), with DequantizeLinear's layout: `scale` has
    `w`'s shape except ceil(n / block_size) along `axis`."""
    import numpy as np
    x = np.moveaxis(np.asarray(w, np.float32), axis, 0)
    n = x.shape[0]
    nb = -(-n // block_size)
    padded = np.zeros((nb * block_size, *x.shape[1:]), np.float32)
    padded[:n] = x
    blocks = padded.reshape(nb, block_size, *x.shape[1:])
    amax = np.abs(blocks).max(axis=1)
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None]), -7, 7).astype(np.int8)
    q = q.reshape(nb * block_size, *x.shape[1:])[:n]
    return np.moveaxis(q, 0, axis), np.ascontiguousarray(np.moveaxis(scale, 0, axis))


def _int4_tensor(name: str, q: "np.ndarray") -> Any:
    """An INT4 TensorProto: two codes per byte, the first in the low nibble."""
    import numpy as np
    from onnx import TensorProto, helper
    flat = q.ravel().astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, list(q.shape), packed.tobytes(), raw=True)
