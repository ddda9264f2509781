"""Static (QDQ) int8 for the UNet, calibrated on the model's own denoising trajectories.

Random calibration data gives poor activation ranges (relative L2 0.2-0.3 measured on an SD
UNet): what the UNet sees at run time is its own latents at each step, so we run the fp32
bundle over a prompt list with the edge_sdk runtime and record every UNet input.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

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
    """A Session that records what it is fed (the calibration data), one image at a time."""

    def __init__(self, inner: Any, feeds: list[dict[str, np.ndarray]]) -> None:
        self.inner, self.inputs, self.outputs = inner, inner.inputs, inner.outputs
        self.feeds = feeds

    def run(self, feeds: Mapping[str, np.ndarray],
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        batch = len(next(iter(feeds.values())))
        # batch 1 each: an NPU graph's shapes, and half the activations held while
        # calibrating a guided step
        self.feeds += [{k: np.array(v[i:i + 1], copy=True) for k, v in feeds.items()}
                       for i in range(batch)]
        return self.inner.run(feeds, outputs)


def unet_trajectories(bundle: Path, prompts: Sequence[str], steps: int | None = None,
                      seed: int = 0, size: tuple[int, int] | None = None
                      ) -> list[dict[str, np.ndarray]]:
    """The UNet inputs of generating each prompt with the fp32 `bundle` (its defaults, at
    `size` (height, width) if given; the k-th prompt with seed `seed + k`), recorded from
    the runtime's own generation, one image (batch 1) a feed. They are small (the latents
    and the prompt's embedding: 0.3 MB a feed for SD 1.5 at 512x512)."""
    pipe = Pipeline.load(bundle)
    feeds: list[dict[str, np.ndarray]] = []
    pipe.components.wrap(N.UNET, lambda session: _Recorder(session, feeds))
    height, width = size if size else (None, None)
    for k, prompt in enumerate(prompts):
        pipe.generate(prompt, GenerationConfig(steps=steps, seed=seed + k, height=height,
                                               width=width))
    log.info("calibration: %d UNet inputs from %d prompts", len(feeds), len(prompts))
    return feeds


def spread(items: Sequence[Any], most: int) -> list[Any]:
    """At most `most` of `items`, drawn without replacement (fixed seed), in their order.
    Not every k-th: a guided step records two inputs (unconditional, then the prompt's),
    and an even stride would keep only the unconditional ones."""
    if len(items) <= most:
        return list(items)
    picks = np.sort(np.random.default_rng(0).choice(len(items), most, replace=False))
    return [items[int(i)] for i in picks]


# (output, options, progress, UNet source or None) -> the bundle written
WriteBundle = Callable[..., Manifest]


def convert_static(output: str | Path, opts: ConvertOptions, say: Callable[[str], None],
                   write: WriteBundle) -> Manifest:
    """Static QDQ as its own step: an fp32 bundle converted aside, the runtime's generations
    over the calibration prompts recorded, activation ranges accumulated over them, then the
    bundle written with its UNet quantized from the fp32 graph with those ranges. With
    --sizes (an NPU's bundle) the UNet graph's shapes are fixed first (converters.npu_graph)."""
    from .export_onnx import INT4_KEEP_FP32
    # glibc's allocator keeps its defaults here: a 64 KiB mmap threshold
    # (osmem.return_freed_memory) made every activation of calibration a fresh mapping,
    # SD 1.5's calibration 1.5x slower (half its CPU time in the kernel)
    scheme = opts.static_qdq or "w8a8"
    prompts = read_prompts(opts.calibration)
    parent = Path(output).resolve().parent
    with tempfile.TemporaryDirectory(dir=parent, prefix=".edge-convert-calib-") as tmp:
        ref = Path(tmp) / "fp32"
        say(f"{scheme}: converting an fp32 reference for calibration")
        write(ref, replace(opts, precision="fp32", vae_encoder=False, vae_stages=False,
                           tiny_vae=None, feature_cache=False, sizes=None,
                           overwrite=False), lambda m: say(f"  (fp32 reference) {m}"))
        m = Manifest.load(ref)
        graph, size = ref / f"{N.UNET}.onnx", _static_size(opts, m)
        if size is not None:
            graph = _static_graph(m, graph, size, say)
        if scheme == "w8a16":  # 16-bit QuantizeLinear is opset 21's
            from .npu_graph import with_opset
            graph = with_opset(graph, 21)
        say(f"{scheme}: calibrating on {len(prompts)} prompts")
        feeds = unet_trajectories(ref, prompts, size=size)
        npu = opts.precisions[N.UNET] in N.QDQ_PRECISIONS
        ranges = activation_ranges(graph, feeds, Path(tmp), scheme, npu, say)
        keep = INT4_KEEP_FP32 + STATIC_FLOAT
        info: dict[str, Any] = {"scheme": scheme, "calibration_inputs": len(feeds),
                                "float_layers": list(keep),
                                "float_ops": list(NPU_FLOAT) if npu else []}
        extra: tuple[str, ...] = ()
        if opts.target_psnr is not None:
            extra = _fallback(graph, ranges, scheme, npu, keep, feeds, opts.target_psnr,
                              Path(tmp), say, info)
        del feeds

        def source(stage: Path) -> list[str]:
            return quantize_qdq(graph, stage, N.UNET, ranges, scheme, npu, keep, extra)
        source.manifest_info = {"static_quantization": info}  # type: ignore[attr-defined]
        return write(output, opts, say, source)


def _fallback(graph: Path, ranges: Path, scheme: str, npu: bool, keep: tuple[str, ...],
              feeds: Sequence[Mapping[str, np.ndarray]], target: float, scratch: Path,
              say: Callable[[str], None], info: dict[str, Any]) -> tuple[str, ...]:
    """--target-psnr: the layers left float (converters.sensitivity), on up to
    SENSITIVITY_INPUTS calibration inputs spread over the trajectories."""
    from .sensitivity import search
    sample = spread(feeds, SENSITIVITY_INPUTS)
    runs = itertools.count()

    def quantize(extra: tuple[str, ...]) -> Path:
        out = scratch / f"q{next(runs)}"
        out.mkdir()
        quantize_qdq(graph, out, N.UNET, ranges, scheme, npu, keep, extra)
        return out / f"{N.UNET}.onnx"

    say(f"{scheme}: per-layer fallback to {target:.1f} dB on {len(sample)} UNet inputs")
    found = search(graph, quantize, sample, target, say)
    info.update(target_psnr=target, output_psnr=round(found.psnr, 2),
                output_psnr_all_quantized=round(found.first_psnr, 2),
                fallback_layers=list(found.nodes))
    return found.nodes


def _static_size(opts: ConvertOptions, m: Manifest) -> tuple[int, int] | None:
    """The (height, width) of an NPU bundle's --sizes, or None."""
    if not opts.sizes:
        return None
    from .export_tflite import parse_sizes
    return parse_sizes(opts.sizes, m.unet.sample_size * m.vae.scale_factor,
                       m.unet.size_multiple)[0]


def _static_graph(m: Manifest, graph: Path, size: tuple[int, int],
                  say: Callable[[str], None]) -> Path:
    from edge_sdk.contracts import DIM_BATCH, DIM_HEIGHT, DIM_WIDTH, DIM_SEQUENCE
    from .npu_graph import make_static
    factor = m.vae.scale_factor
    dims = {DIM_BATCH: 1, DIM_HEIGHT: size[0] // factor, DIM_WIDTH: size[1] // factor,
            DIM_SEQUENCE: m.tokenizer.max_length}
    say(f"static shapes for the NPU: {size[1]}x{size[0]} px, batch 1")
    return make_static(graph, graph.with_name("unet_static.onnx"), dims)


# Where a CPU runs the graph (dynamic-shape static int8), only the heavy ops are quantized: the
# rest stays float between them. An NPU wants every op it can take quantized.
CPU_OPS = ["Conv", "MatMul", "Gemm"]
# Activations one calibration pass may hold (one UNet call, one group of tensors): SD 1.5's
# at 512x512 are ~12 GB, so ~3 passes a feed with its weights (3.4 GB) in ~8 GB
ACTIVATION_BUDGET = 4 << 30
# A tensor's histogram is kept under this many bins (2048 at its first input)
MAX_BINS = 16 * 2048
# --target-psnr's search measures on this many calibration inputs (spread over them)
SENSITIVITY_INPUTS = 8
# Kept float by static quantization: the sinusoidal timestep embedding, whose arguments span
# 0..999 rad: 8-bit activations (3.9 rad a step) made the UNet's output wrong by 46-66 %
# (relative L2) at some timesteps, fine at others
STATIC_FLOAT = ("/time_proj/",)
# Left float on the NPU (its fp16 units run them): the HTP refused a quantized LayerNorm with
# int8 weights (onnxruntime-qnn 2.7, error 3110)
NPU_FLOAT = ("LayerNormalization",)
# Percentile of the activation histograms kept: 8-bit activations clip the rare extremes of
# early steps to keep resolution for the rest; 16-bit ones have resolution to spare.
PERCENTILE = {"w8a8": 99.99, "w8a16": 99.999}


def _qnn_config(graph: Path, scheme: str, npu: bool, keep: tuple[str, ...],
                exact: tuple[str, ...] = ()) -> Any:
    """onnxruntime's QDQ configuration made for Qualcomm's QNN (the op types it takes, the
    fixed ranges some ops need), int8 symmetric weights, uint8 or uint16 activations; nodes
    named by `keep` stay float. Weights are per-channel for a CPU; per-tensor for the NPU:
    with per-channel ones the HTP's UNet output drifted from the same graph on the CPU EP
    (relative L2 up to 0.19 at t=999, 0.005 per-tensor; onnxruntime-qnn 2.7 emulator)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantType
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
    exact_set = set(exact)
    exclude = [n.name for n in onnx.load(str(graph), load_external_data=False).graph.node
               if any(k in n.name for k in keep) or n.name in exact_set]
    cfg = get_qnn_qdq_config(
        str(graph), None, calibrate_method=CalibrationMethod.Percentile,
        activation_type=QuantType.QUInt16 if scheme == "w8a16" else QuantType.QUInt8,
        weight_type=QuantType.QInt8, per_channel=not npu, weight_symmetric=True,
        op_types_to_quantize=None if npu else CPU_OPS, nodes_to_exclude=exclude)
    cfg.op_types_to_quantize = [t for t in cfg.op_types_to_quantize if t not in NPU_FLOAT]
    return cfg


def activation_ranges(graph: Path, feeds: Sequence[Mapping[str, np.ndarray]], scratch: Path,
                      scheme: str, npu: bool, say: Callable[[str], None]) -> Path:
    """The activation ranges of `graph` over `feeds`, written as onnxruntime's calibration
    cache (whose path is returned): per-tensor histograms accumulated one feed at a time and
    cut at a percentile. onnxruntime's own calibrator keeps every activation of every feed;
    one UNet call's alone are ~12 GB for SD 1.5 at 512x512 (its calibrator peaked at 19 GB
    before we stopped it), so the tensors are split into groups of at most
    ACTIVATION_BUDGET bytes for one call, and the feeds run once per group, each group
    through a graph that outputs only its tensors (the weights' file shared)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import (HistogramCollector, TensorsData,
                                                    save_tensors_data)
    cfg = _qnn_config(graph, scheme, npu, ())
    groups = _tensor_groups(graph, cfg.op_types_to_quantize, feeds[0], ACTIVATION_BUDGET)
    collector = HistogramCollector(method="percentile", symmetric=False, num_bins=2048,
                                   num_quantized_bins=128, percentile=PERCENTILE[scheme],
                                   scenario="same")
    t0 = time.perf_counter()
    for g, names in enumerate(groups, 1):
        path = _with_outputs(graph, names, f"calib{g}")
        so = ort.SessionOptions()
        so.enable_cpu_mem_arena = False  # each run's activations freed, not pooled
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for i, feed in enumerate(feeds, 1):
            got = sess.run(names, dict(feed))
            arrays = dict(zip(names, got))
            bound_bins(collector.histogram_dict, arrays, MAX_BINS)
            with contextlib.redirect_stdout(io.StringIO()):  # onnxruntime prints per call
                collector.collect({n: [a] for n, a in arrays.items()})
            del got, arrays
            if i % 10 == 0 or i == len(feeds):
                say(f"  calibrated {i}/{len(feeds)} UNet inputs, tensor group {g}/"
                    f"{len(groups)} ({time.perf_counter() - t0:.0f} s)")
        del sess
        path.unlink()
    out = scratch / "ranges.json"
    with contextlib.redirect_stdout(io.StringIO()):
        save_tensors_data(TensorsData(CalibrationMethod.Percentile,
                                      collector.compute_collection_result()), out)
    return out


def bound_bins(histograms: dict[str, tuple], arrays: Mapping[str, np.ndarray],
               limit: int) -> None:
    """Called before onnxruntime's collector takes `arrays`: it widens a histogram at its
    first input's bin width when a later input reaches further (its own calibrator sees all
    inputs at once; we feed one at a time), so a tensor near zero in its first input would
    grow millions of bins (63 million, measured: numpy refuses). A histogram the new input
    would widen past `limit` bins is first re-binned coarser over its same range (counts
    spread evenly within each old bin), so it ends near `limit`. In place; both of its
    layouts are kept: (hist, edges, min, max[, threshold])."""
    for name, arr in arrays.items():
        value = histograms.get(name)
        if value is None or arr.size == 0:
            continue
        hist, edges = value[0], value[1]
        reach = float(np.nanmax(np.abs(arr)))
        top = float(edges[-1])
        grown = len(hist) * max(1.0, reach / top) if top > 0 else float("inf")
        if grown <= limit or top <= 0:
            continue
        bins = max(2, int(len(hist) * limit / grown) // 2 * 2)
        new_edges = np.linspace(edges[0], edges[-1], bins + 1).astype(edges.dtype)
        cdf = np.concatenate([[0.0], np.cumsum(hist, dtype=np.float64)])
        new_cdf = np.rint(np.interp(new_edges.astype(np.float64), edges.astype(np.float64),
                                    cdf)).astype(np.int64)  # onnxruntime adds int counts
        histograms[name] = (np.diff(new_cdf), new_edges, *value[2:])


def _tensor_groups(graph: Path, op_types: Sequence[str], feed: Mapping[str, np.ndarray],
                   budget: int) -> list[list[str]]:
    """The float activations around the ops to quantize (as onnxruntime's calibrator picks
    them), in groups of at most `budget` bytes for one call on `feed`'s shapes."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed
    model = onnx.load(str(graph), load_external_data=False)
    for i in model.graph.input:
        if i.name in feed:
            make_input_shape_fixed(model.graph, i.name, list(feed[i.name].shape))
    model = onnx.shape_inference.infer_shapes(model)
    infos = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)
             + list(model.graph.input)}
    consts = {t.name for t in model.graph.initializer}
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    sizes: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type not in op_types:
            continue
        for name in list(node.input) + list(node.output):
            vi = infos.get(name)
            if name in sizes or name in consts or vi is None \
                    or vi.type.tensor_type.elem_type not in floats:
                continue
            dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
            sizes[name] = 4 * int(np.prod(dims)) if all(dims) else budget // 8
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _with_outputs(graph: Path, names: Sequence[str], stem: str) -> Path:
    """`graph` with `names` as its outputs, saved beside it (its weights' file shared)."""
    import onnx
    from onnx import helper
    model = onnx.load(str(graph), load_external_data=False)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    path = graph.with_name(f"{graph.stem}.{stem}.onnx")
    onnx.save(model, str(path))
    return path


def quantize_qdq(graph: Path, out_dir: Path, name: str, ranges: Path, scheme: str,
                 npu: bool, keep: tuple[str, ...] = (), exact: tuple[str, ...] = ()
                 ) -> list[str]:
    """`graph` as QDQ (`scheme` w8a8 or w8a16) with the activation ranges `ranges`
    (activation_ranges). Nodes whose name contains a string of `keep`, or is one of
    `exact`, stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    cfg = _qnn_config(graph, scheme, npu, keep, exact)
    model = run_ort_quantizer(
        lambda raw: quantize_static(
            str(graph), raw, None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=cfg.op_types_to_quantize, per_channel=cfg.per_channel,
            activation_type=cfg.activation_type, weight_type=cfg.weight_type,
            nodes_to_exclude=cfg.nodes_to_exclude, use_external_data_format=True,
            calibrate_method=CalibrationMethod.Percentile,
            extra_options={**cfg.extra_options, "MatMulConstBOnly": not npu},
            calibration_cache_path=ranges), out_dir)
    return save_graph(model, out_dir, name)
