"""Weight quantization of exported ONNX components.

int8: dynamic quantization of Conv and MatMul/Gemm weights (uint8 weights, activations
quantized at run time: ConvInteger / MatMulInteger), so both the ~69 % of an SD UNet's
parameters that sit in Conv layers and the ~31 % in MatMul/Gemm shrink 4x.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def quantize_int8_dynamic(graph: Path, out_dir: Path, name: str) -> list[str]:
    """Quantize `graph` (an .onnx with external data) to `<out_dir>/<name>.onnx` (+ .data)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs a "run pre-processing" hint to root
    try:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-q-") as tmp:
            raw = Path(tmp) / "q.onnx"
            quantize_dynamic(str(graph), str(raw), weight_type=QuantType.QUInt8,
                             op_types_to_quantize=["Conv", "MatMul", "Gemm"],
                             use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True,
                                            "DefaultTensorType": onnx.TensorProto.FLOAT})
            model = onnx.load(str(raw), load_external_data=True)
    finally:
        root.setLevel(level)
    return save_graph(model, out_dir, name)


def save_graph(model: "object", out_dir: Path, name: str) -> list[str]:
    """Save with the bundle's layout: `<name>.onnx` + one `<name>.onnx.data` file."""
    import onnx
    graph_file, data_file = f"{name}.onnx", f"{name}.onnx.data"
    onnx.save_model(model, str(out_dir / graph_file), save_as_external_data=True,
                    all_tensors_to_one_file=True, location=data_file, size_threshold=1024)
    return [graph_file] + ([data_file] if (out_dir / data_file).exists() else [])
