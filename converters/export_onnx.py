"""ONNX export, one function per component, each with a fixed I/O contract (edge_sdk.names).

Every graph has dynamic batch (and height/width for UNet and VAE), weights stored as external
data next to the graph, so onnxruntime can map them instead of copying.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable

from edge_sdk import names as N

from .quantize import save_graph

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def _wrappers() -> dict[str, Callable[[Any], Any]]:
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.m(input_ids=input_ids, return_dict=True)
            return out.last_hidden_state, out.pooler_output

    class Unet(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                    encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            return self.m(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.m.decode(latent_sample, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            moments = self.m.quant_conv(self.m.encoder(image)) if self.m.quant_conv is not None \
                else self.m.encoder(image)
            mean, logvar = torch.chunk(moments, 2, dim=1)
            return mean, torch.clamp(logvar, -30.0, 20.0)  # as DiagonalGaussianDistribution

    return {N.TEXT_ENCODER: TextEncoder, N.UNET: Unet, N.VAE_DECODER: VaeDecoder,
            N.VAE_ENCODER: VaeEncoder}


def example_inputs(component: str, model: Any) -> tuple[Any, ...]:
    """Example tensors to trace with; batch 2 and even latent sizes (shapes stay dynamic)."""
    import torch
    cfg = model.config
    if component == N.TEXT_ENCODER:
        return (torch.full((2, cfg.max_position_embeddings), cfg.eos_token_id, dtype=torch.int64),)
    if component == N.UNET:
        s = 2 ** (len(cfg.block_out_channels) - 1) * 2
        return (torch.randn(2, cfg.in_channels, s, s + s // 2), torch.tensor([999.0, 500.0]),
                torch.randn(2, 7, cfg.cross_attention_dim))  # any length: the axis is dynamic
    f = 2 ** (len(cfg.block_out_channels) - 1)
    if component == N.VAE_DECODER:
        return (torch.randn(1, cfg.latent_channels, 4, 6),)
    return (torch.randn(1, cfg.in_channels, 4 * f, 6 * f),)


_IO: dict[str, tuple[list[str], list[str], dict[str, dict[int, str]]]] = {
    N.TEXT_ENCODER: ([N.TEXT_INPUT_IDS], [N.TEXT_HIDDEN_STATES, N.TEXT_POOLED],
                     {N.TEXT_INPUT_IDS: {0: N.DIM_BATCH}, N.TEXT_HIDDEN_STATES: {0: N.DIM_BATCH},
                      N.TEXT_POOLED: {0: N.DIM_BATCH}}),
    N.UNET: ([N.UNET_SAMPLE, N.UNET_TIMESTEP, N.UNET_CONTEXT], [N.UNET_OUTPUT],
             {N.UNET_SAMPLE: {0: N.DIM_BATCH, 2: N.DIM_HEIGHT, 3: N.DIM_WIDTH},
              N.UNET_TIMESTEP: {0: N.DIM_BATCH},
              N.UNET_CONTEXT: {0: N.DIM_BATCH, 1: N.DIM_SEQUENCE},
              N.UNET_OUTPUT: {0: N.DIM_BATCH, 2: N.DIM_HEIGHT, 3: N.DIM_WIDTH}}),
    N.VAE_DECODER: ([N.VAE_LATENTS], [N.VAE_IMAGE],
                    {N.VAE_LATENTS: {0: N.DIM_BATCH, 2: N.DIM_HEIGHT, 3: N.DIM_WIDTH},
                     N.VAE_IMAGE: {0: N.DIM_BATCH, 2: N.DIM_HEIGHT, 3: N.DIM_WIDTH}}),
    N.VAE_ENCODER: ([N.VAE_IMAGE], [N.VAE_LATENT_MEAN, N.VAE_LATENT_LOGVAR],
                    {N.VAE_IMAGE: {0: N.DIM_BATCH, 2: N.DIM_HEIGHT, 3: N.DIM_WIDTH},
                     N.VAE_LATENT_MEAN: {0: N.DIM_BATCH, 2: N.DIM_HEIGHT, 3: N.DIM_WIDTH},
                     N.VAE_LATENT_LOGVAR: {0: N.DIM_BATCH, 2: N.DIM_HEIGHT, 3: N.DIM_WIDTH}}),
}


# Layers kept fp32 under int4: the first and last convolutions (they touch the latents
# directly) and the timestep embedding (small, and every block depends on it).
INT4_KEEP_FP32 = ("/conv_in/", "/conv_out/", "/time_embedding/")


def export_component(component: str, model: Any, out_dir: Path, precision: str = "fp32",
                     opset: int = DEFAULT_OPSET) -> list[str]:
    """Export one component to `<out_dir>/<component>.onnx` (+ `.onnx.data`); return the
    file names written. (convert() runs the two halves itself, releasing the torch model in
    between: see trace_fp32.)"""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{component}-") as tmp:
        src = trace_fp32(component, model, Path(tmp), opset)
        return finish_component(component, src, out_dir, precision)


def trace_fp32(component: str, model: Any, scratch: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Trace `model` to an fp32 `<scratch>/model.onnx` and return its path. The weights are
    not read back here: the caller drops the torch model before finish_component loads or
    quantizes the graph, so torch and ONNX copies of a 3.4 GB UNet are never resident
    together with the quantizer's."""
    import onnx
    import torch

    wrapper = _wrappers()[component](model).eval()
    inputs, outputs, axes = _IO[component]
    example = example_inputs(component, model)
    raw = scratch / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(wrapper, example, str(raw), input_names=inputs, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
                          dynamo=False)
    graph = onnx.load(str(raw), load_external_data=False)
    _name_output_dims(graph, wrapper, example, axes)
    onnx.save(graph, str(raw))  # external-data references stay as the exporter wrote them
    return raw


def finish_component(component: str, src: Path, out_dir: Path, precision: str) -> list[str]:
    """The fp32 graph `src` -> `<out_dir>/<component>.onnx` (+ data) at `precision`."""
    import onnx
    if precision in ("int8", "int4"):
        from .quantize import quantize_int4_blockwise, quantize_int8_dynamic
        if precision == "int8":
            return quantize_int8_dynamic(src, out_dir, component)
        return quantize_int4_blockwise(src, out_dir, component, keep=INT4_KEEP_FP32)
    graph = onnx.load(str(src), load_external_data=True)
    if precision == "fp16":
        graph = to_fp16(graph)
    graph.doc_string = f"edge-sdk {component} ({precision})"
    return save_graph(graph, out_dir, component)


def _name_output_dims(graph: Any, wrapper: Any, example: tuple[Any, ...],
                      axes: dict[str, dict[int, str]]) -> None:
    """The tracer invents names for output dims it cannot prove static (e.g. CLIP's sequence
    length). Give them the value they have, unless the dim is one of our dynamic axes."""
    import torch
    with torch.no_grad():
        outs = wrapper(*example)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for value, tensor in zip(graph.graph.output, outs):
        dynamic = axes.get(value.name, {})
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if i in dynamic:
                dim.dim_param = dynamic[i]
            elif dim.dim_param:
                dim.dim_value = int(tensor.shape[i])


def to_fp16(graph: Any) -> Any:
    """fp16 weights and compute with fp32 inputs/outputs (casts at the edges)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    # Resize's scales and the ops that must stay fp32 on CPU are handled by the converter's
    # default block list; keep_io_types leaves the graph's interface unchanged.
    return convert_float_to_float16(graph, keep_io_types=True, disable_shape_infer=False)
