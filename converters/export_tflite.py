"""TFLite export with litert-torch (no TensorFlow) of one component, by its kind's exporter.

TFLite shapes are static. The UNet, the VAE decoder and the VAE encoder get one signature per
requested size in a single `.tflite` file (the weights are stored once and shared by the
signatures); the runtime picks the signature whose shapes match its inputs. Every signature
has batch 1: the runtime runs a larger batch image by image. Signature inputs and outputs
carry the contract's names (edge_sdk.contracts), like the ONNX graphs, so the manifest's I/O contract is
the same for both formats.

Precisions go through ai-edge-quantizer: fp16 weights (float casting, fp32 compute), int8
(dynamic: int8 weights per channel, activations quantized at run time) and int4: int4 in
blocks of 32 for the fully connected layers, int8 per channel for the convolutions (the
quantizer has no block-wise int4 for CONV_2D, and per-channel int4 convolutions cost the
default model's UNet 12 dB PSNR: relative error 0.18 against 0.04 this way).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

from edge_sdk import names as N
from edge_sdk.contracts import DIM_SEQUENCE, ComponentContract
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import TensorSpec

from .registry import Exporter, Shapes

log = logging.getLogger(__name__)

# what a TFLite component can be converted to (int8-full: the UNet, converters.full_integer)
TFLITE_PRECISIONS = ("fp32", "fp16", "int8", "int4", N.FULL_INT)


def require_litert_torch() -> Any:
    try:
        import litert_torch
    except ImportError as exc:
        raise ConversionError("--format tflite needs litert-torch and ai-edge-quantizer: "
                              "install the [tflite-convert] extra (`pip install "
                              "'.[tflite-convert]'` in a clone of edge-sdk)") from exc
    # its per-pass progress lines would bury edge-convert's own; kept with --debug
    litert_torch.config.show_progress = log.isEnabledFor(logging.DEBUG)
    return litert_torch


def parse_sizes(spec: str | None, native: int, multiple: int) -> list[tuple[int, int]]:
    """'512x512,512x768' (width x height, pixels) -> [(height, width), ...]; None: native."""
    if not spec:
        return [(native, native)]
    sizes: list[tuple[int, int]] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        w, _, h = part.lower().partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) % multiple or int(h) % multiple \
                or int(w) == 0 or int(h) == 0:
            raise ConversionError(f"--sizes: {part!r} is not WIDTHxHEIGHT in pixels, both "
                                  f"positive multiples of {multiple} (e.g. 512x512)")
        if (int(h), int(w)) not in sizes:
            sizes.append((int(h), int(w)))
    if not sizes:
        raise ConversionError("--sizes is empty; give e.g. 512x512,512x768")
    return sizes


def _named(exp: Exporter, model: Any) -> Any:
    """The exporter's module, called with keyword inputs and returning named outputs:
    litert-torch names a signature's inputs after the keywords and its outputs after the
    dict's keys."""
    import torch
    inputs, outputs = exp.input_names(model), exp.contract.output_names()
    inner = exp.wrap(model)

    class Named(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kw: torch.Tensor) -> dict[str, torch.Tensor]:
            out = self.inner(*(kw[n] for n in inputs))
            return dict(zip(outputs, out if isinstance(out, tuple) else (out,)))

    return Named().eval()


def export_tflite(role: str, exp: Exporter, model: Any, out_dir: Path, precision: str,
                  sizes: Sequence[tuple[int, int]], shapes: Shapes,
                  cache: tuple[Path, str] | None = None) -> list[str]:
    """Convert `model` to `<out_dir>/<role>.tflite` at `precision`; return [file name].
    `sizes`: (height, width) in pixels, one signature each for the sized components.
    `cache`: (folder, key) of the fp32 export to reuse or keep (converters.export_cache)."""
    name = f"{role}.tflite"
    dst = out_dir / name
    if cache is not None:
        from .export_cache import cached_export
        src = cached_export(cache[0], role, cache[1],
                            lambda path: _trace(exp, model, sizes, shapes, path))
        if precision == "fp32":
            shutil.copyfile(src, dst)
        else:
            quantize_tflite(src, dst, precision)
        return [name]
    if precision == "fp32":
        _trace(exp, model, sizes, shapes, dst)
        return [name]
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{role}-") as tmp:
        src = Path(tmp) / "fp32.tflite"
        _trace(exp, model, sizes, shapes, src)
        quantize_tflite(src, dst, precision)
    return [name]


def _trace(exp: Exporter, model: Any, sizes: Sequence[tuple[int, int]], shapes: Shapes,
           path: Path) -> None:
    """litert-torch's fp32 conversion of `model`, one signature per size, written to `path`."""
    litert_torch = require_litert_torch()
    import torch
    _exact_upsamplers(model)
    wrapper = _named(exp, model)
    converter = None
    for size in (sizes if exp.sized else [sizes[0]]):
        key = f"{size[1]}x{size[0]}" if exp.sized else "text"
        kw = exp.example(model, 1, size, shapes)
        converter = (litert_torch.signature(key, wrapper, sample_kwargs=kw) if converter is None
                     else converter.signature(key, wrapper, sample_kwargs=kw))
    with torch.no_grad():
        converted = converter.convert()  # type: ignore[union-attr]
    converted.export(str(path))


def _exact_upsamplers(model: Any) -> None:
    """At latent sides the UNet cannot halve evenly (13x9 at 104x72 px), diffusers'
    upsamplers resize to the skip connection's size (`output_size`) with nearest-neighbour
    interpolation, which litert-torch lowers with half-pixel centres: another pixel pick
    than torch's, and a UNet output off by up to 0.56. For a skip of m pixels the input has
    ceil(m / 2), and torch's pick floor(i * ceil(m/2) / m) is floor(i / 2): doubling and
    keeping the first m rows and columns is the same map, which every backend computes
    alike. ONNX keeps torch's Resize (its 'asymmetric' 'floor' mode is torch's)."""
    import types

    import torch.nn.functional as F
    from diffusers.models.upsampling import Upsample2D
    for m in model.modules():
        if not isinstance(m, Upsample2D) or not m.interpolate or m.use_conv_transpose \
                or m.norm is not None or getattr(m, "name", "conv") != "conv":
            continue
        original = m.forward

        def forward(self: Any, hidden_states: Any, output_size: Any = None, *args: Any,
                    _original: Any = original, **kwargs: Any) -> Any:
            if output_size is None:
                return _original(hidden_states, *args, **kwargs)
            x = F.interpolate(hidden_states, scale_factor=2.0, mode="nearest")
            x = x[:, :, :output_size[0], :output_size[1]]
            return self.conv(x) if self.use_conv else x
        m.forward = types.MethodType(forward, m)


def quantize_tflite(src: Path, dst: Path, precision: str) -> None:
    """fp16 / int8 / int4 weights with ai-edge-quantizer (see the module docstring)."""
    from ai_edge_quantizer import qtyping, quantizer, recipe
    if precision == "int8":
        q = quantizer.Quantizer(str(src), recipe.dynamic_wi8_afp32())
    elif precision == "int4":
        q = quantizer.Quantizer(str(src))
        op = qtyping.TFLOperationName
        q.add_dynamic_config(".*", op.ALL_SUPPORTED, 8)
        q.add_dynamic_config(".*", op.FULLY_CONNECTED, 4, qtyping.QuantGranularity.BLOCKWISE_32)
    elif precision == "fp16":
        q = quantizer.Quantizer(str(src))
        q.update_quantization_recipe(
            regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
            algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING,
            op_config=qtyping.OpQuantizationConfig(
                weight_tensor_config=qtyping.TensorQuantizationConfig(
                    num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
                compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True))
    else:
        raise ConversionError(f"precision {precision!r} is not supported for TFLite; choose "
                              f"one of {list(TFLITE_PRECISIONS)}")
    q.quantize().export_model(str(dst), overwrite=True)


def tflite_io(path: Path, contract: ComponentContract
              ) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The manifest's I/O specs of a converted file: names and dtypes from its first
    signature; batch and (for sized components) height/width named like the ONNX axes, since
    the runtime serves them by looping and by choosing a signature."""
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(str(path))
    key = next(iter(it.get_signature_list()))
    runner = it.get_signature_runner(key)
    axes = contract.dynamic_axes()

    def specs(details: dict[str, Any], order: list[str]) -> tuple[TensorSpec, ...]:
        out = []
        for name, d in details.items():
            dims: list[int | str] = [int(x) for x in d["shape"]]
            for i, axis in axes.get(name, {}).items():
                if axis != DIM_SEQUENCE:
                    dims[i] = axis
            out.append(TensorSpec(name, str(d["dtype"].__name__), tuple(dims)))
        return tuple(sorted(out, key=lambda s: order.index(s.name)))

    return (specs(runner.get_input_details(), contract.input_names(optional=True)),
            specs(runner.get_output_details(), contract.output_names()))
