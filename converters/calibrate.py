"""Static (QDQ) int8 for the UNet, calibrated on the model's own denoising trajectories.

Random calibration data gives poor activation ranges (relative L2 0.2-0.3 measured on an SD
UNet): what the UNet sees at run time is its own latents at each step, so we run the fp32
bundle over a prompt list with the edge_sdk runtime and record every UNet input.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk import names as N
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import Manifest

from .options import ConvertOptions
from .quantize import run_ort_quantizer, save_graph

log = logging.getLogger(__name__)

# Used when no --calibration file is given: everyday SD subjects and simple scene captions
# (what the shipped shapes model knows), with varied layouts and colours.
DEFAULT_PROMPTS = (
    "a photo of a cat sitting on a windowsill", "a lighthouse on a cliff at sunset",
    "a bowl of fruit on a wooden table", "a city street at night, rain, neon lights",
    "a portrait of an old man, studio lighting", "a snowy mountain above a blue lake",
    "a red circle on a blue background", "two small green squares at the top",
    "a large yellow star on the left, black background", "three purple triangles at the bottom",
    "an orange square in the center on a white background", "a blue star on the right",
)


def read_prompts(path: str | Path | None) -> list[str]:
    """One prompt per line (blank lines and `#` comments skipped); the default set if None."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not prompts:
        raise ConversionError(f"calibration file {path} holds no prompts; put one per line")
    return prompts


class _Recorder:
    """A Session that records what it is fed (the calibration data)."""

    def __init__(self, inner: Any, feeds: list[dict[str, np.ndarray]]) -> None:
        self.inner, self.inputs, self.outputs = inner, inner.inputs, inner.outputs
        self.feeds = feeds

    def run(self, feeds: Mapping[str, np.ndarray],
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        self.feeds.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        return self.inner.run(feeds, outputs)


def unet_trajectories(bundle: Path, prompts: Sequence[str], steps: int | None = None,
                      seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The UNet inputs of generating each prompt with the fp32 `bundle` (its defaults; the
    k-th prompt with seed `seed + k`), recorded from the runtime's own generation."""
    pipe = Pipeline.load(bundle)
    feeds: list[dict[str, np.ndarray]] = []
    pipe.components.wrap(N.UNET, lambda session: _Recorder(session, feeds))
    for k, prompt in enumerate(prompts):
        pipe.generate(prompt, GenerationConfig(steps=steps, seed=seed + k))
    log.info("calibration: %d UNet calls from %d prompts", len(feeds), len(prompts))
    return feeds


# (output, options, progress, UNet source or None) -> the bundle written
WriteBundle = Callable[..., Manifest]


def convert_static(output: str | Path, opts: ConvertOptions, say: Callable[[str], None],
                   write: WriteBundle) -> Manifest:
    """Static int8 as its own step: an fp32 bundle converted aside, the runtime's generations
    over the calibration prompts recorded, then the bundle written with its UNet quantized
    from the fp32 graph with those activation ranges."""
    from .export_onnx import INT4_KEEP_FP32
    prompts = read_prompts(opts.calibration)
    parent = Path(output).resolve().parent
    with tempfile.TemporaryDirectory(dir=parent, prefix=".edge-convert-calib-") as tmp:
        ref = Path(tmp) / "fp32"
        say("static int8: converting an fp32 reference for calibration")
        write(ref, replace(opts, precision="fp32", vae_encoder=False, vae_stages=False,
                           tiny_vae=None, feature_cache=False,
                           overwrite=False), lambda m: say(f"  (fp32 reference) {m}"))
        say(f"static int8: calibrating on {len(prompts)} prompts")
        feeds = unet_trajectories(ref, prompts)
        return write(output, opts, say, lambda stage: quantize_int8_static(
            ref / f"{N.UNET}.onnx", stage, N.UNET, feeds, keep=INT4_KEEP_FP32))


def quantize_int8_static(graph: Path, out_dir: Path, name: str,
                         feeds: Sequence[Mapping[str, np.ndarray]],
                         keep: tuple[str, ...] = ()) -> list[str]:
    """QDQ int8: per-channel int8 weights, uint8 activations with ranges from `feeds`
    (percentile calibration, robust to the rare extreme activations of early steps). Nodes
    whose name contains a string of `keep` stay fp32."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> Mapping[str, np.ndarray] | None:
            return next(self._it, None)

    exclude = [n.name for n in onnx.load(str(graph), load_external_data=False).graph.node
               if any(k in n.name for k in keep)]
    model = run_ort_quantizer(
        lambda raw: quantize_static(
            str(graph), raw, Reader(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude, use_external_data_format=True,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={"MatMulConstBOnly": True, "CalibPercentile": 99.99,
                           "CalibTensorRangeSymmetric": False}), out_dir)
    return save_graph(model, out_dir, name)
