"""Full-integer TFLite (`--format tflite --precision int8-full`): the UNet's weights *and*
activations int8, as Edge TPU, Ethos-U and NNAPI-style delegates want them, with float
inputs and outputs at its edges (the runtime feeds it like any TFLite UNet).

Calibrated like the ONNX static schemes (converters.calibrate): an fp32 TFLite bundle is
converted aside, the runtime's own generations over the calibration prompts are recorded
(one UNet input a call, batch 1: a signature's shape), and ai-edge-quantizer's static
quantization takes its activation ranges from them; its quantized UNet replaces the fp32
one in the bundle written next. The fp32 reference's UNet is the one quantized: it is not
traced twice.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edge_sdk import names as N
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import Manifest

from .calibrate import WriteBundle, read_prompts, spread, unet_trajectories
from .options import ConvertOptions

log = logging.getLogger(__name__)

# Left float inside the integer UNet, by tensor name (litert-torch names them after the
# torch module path): the sinusoidal timestep embedding, whose arguments span 0..999 rad,
# which 8-bit activations cannot hold: quantized, the default model's UNet output was 0.63
# from fp32's (relative L2; 0.060 with it float), as on ONNX (calibrate.STATIC_FLOAT). It
# is one multiply, a SIN and a COS per channel, for the CPU beside an accelerator.
FULL_INT_FLOAT = (".*time_proj.*",)
# Calibration inputs used, spread over the recorded trajectories (each is one UNet call
# run with every activation kept, as LiteRT's interpreter keeps them for calibration)
FULL_INT_INPUTS = 48


def convert_full_int(output: str | Path, opts: ConvertOptions, say: Callable[[str], None],
                     write: WriteBundle) -> Manifest:
    """The fp32 TFLite reference converted aside (every --sizes size), its UNet inputs
    recorded over the calibration prompts (shared out over the sizes), then the bundle
    written with the reference's UNet quantized to full integer."""
    prompts = read_prompts(opts.calibration)
    parent = Path(output).resolve().parent
    with tempfile.TemporaryDirectory(dir=parent, prefix=".edge-convert-calib-") as tmp:
        ref = Path(tmp) / "fp32"
        say("int8-full: converting an fp32 TFLite reference for calibration")
        write(ref, replace(opts, precision="fp32", vae_encoder=False, vae_stages=False,
                           tiny_vae=None, overwrite=False),
              lambda m: say(f"  (fp32 reference) {m}"))
        m = Manifest.load(ref)
        fp32 = ref / m.components[N.UNET].path
        check_calibration_fits(fp32)
        sizes = m.static_sizes or ((m.unet.sample_size * m.vae.scale_factor,) * 2,)
        say(f"int8-full: calibrating on {len(prompts)} prompts over {len(sizes)} size(s)")
        feeds: list[dict[str, np.ndarray]] = []
        for j, size in enumerate(sizes):
            share = list(prompts[j::len(sizes)]) or list(prompts)  # every signature some
            feeds += spread(unet_trajectories(ref, share, size=(int(size[0]), int(size[1]))),
                            max(1, FULL_INT_INPUTS // len(sizes)))
        info: dict[str, Any] = {"scheme": N.FULL_INT, "calibration_inputs": len(feeds),
                                "float_layers": list(FULL_INT_FLOAT)}

        def source(stage: Path) -> list[str]:
            name = f"{N.UNET}.tflite"
            quantize_full_int(fp32, stage / name, feeds, FULL_INT_FLOAT, say)
            info["float_ops"] = float_ops(stage / name)  # what the quantizer left float
            return [name]
        source.manifest_info = {"static_quantization": info}  # type: ignore[attr-defined]
        return write(output, opts, say, source)


def signature_data(path: Path, feeds: Sequence[Mapping[str, np.ndarray]]
                   ) -> dict[str, list[dict[str, np.ndarray]]]:
    """`feeds` sorted out to the signatures of the TFLite model at `path` whose input
    shapes they fit, each cast to the signature's input dtypes; every signature must get
    some (a ConversionError names the one without)."""
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(str(path))
    out: dict[str, list[dict[str, np.ndarray]]] = {}
    for key in it.get_signature_list():
        details = it.get_signature_runner(key).get_input_details()
        out[key] = [{k: np.asarray(v, dtype=details[k]["dtype"]) for k, v in f.items()}
                    for f in feeds
                    if set(f) == set(details)
                    and all(tuple(v.shape) == tuple(details[k]["shape"]) for k, v in f.items())]
        if not out[key]:  # every size has prompts: the runtime fed other names or shapes
            raise ConversionError(f"int8-full: no recorded UNet input fits signature {key!r} "
                                  f"of {path.name} (inputs {sorted(details)}); this is a bug "
                                  "of edge-convert: please report it with the command line")
    return out


def quantize_full_int(src: Path, dst: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                      keep_float: Sequence[str] = (),
                      say: Callable[[str], None] = lambda m: log.info("%s", m)) -> None:
    """`src` (fp32 TFLite) statically quantized with ai-edge-quantizer: int8 weights per
    channel and int8 activations whose ranges are the min/max over `feeds`
    (activation_ranges); the model's inputs and outputs stay float (quantized and
    dequantized inside), and tensors whose name matches a regex of `keep_float` stay
    float. Written to `dst`."""
    from ai_edge_quantizer import quantizer, recipe
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.qtyping import TFLOperationName as Op
    q = quantizer.Quantizer(str(src), recipe.static_wi8_ai8())
    # float at the edges: its virtual input and output ops left alone, so the first and
    # last quantized ops get a QUANTIZE / DEQUANTIZE of their own instead
    for regex, op in [(".*", Op.INPUT), (".*", Op.OUTPUT)] \
            + [(r, Op.ALL_SUPPORTED) for r in keep_float]:
        q.update_quantization_recipe(regex=regex, operation_name=op,
                                     algorithm_key=AlgorithmName.NO_QUANTIZE)
    data = signature_data(src, feeds)
    # the quantizer's own calibration, on one input a signature, names the tensors that
    # need ranges and their layout; the ranges themselves are ours
    template: dict[str, Any] = {}
    for key, items in data.items():
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its progress bars, its interpreter's warning
            template.update(q.calibrate({key: items[:1]}, num_threads=os.cpu_count() or 1))
    ranges = activation_ranges(src, data, template, say)
    with contextlib.redirect_stderr(io.StringIO()):
        quantized = q.quantize(ranges, enable_progress_bar=False,
                               enable_progress_report=False)
    quantized.export_model(str(dst), overwrite=True)


def activation_ranges(path: Path, data: Mapping[str, Sequence[Mapping[str, np.ndarray]]],
                      template: Mapping[str, Mapping[str, np.ndarray]],
                      say: Callable[[str], None]) -> dict[str, Any]:
    """`template` (a calibration result of ai-edge-quantizer) with the min and max of each
    of its float tensors over every input of `data` ({signature: inputs}), read from the
    fp32 model at `path` run with all its tensors kept. ai-edge-quantizer's own calibration
    merges inputs by a moving average of their min/max (0.95), which pulls a range towards
    the last inputs', and a UNet's activations differ widely over the timesteps: on the
    default model's UNet its ranges left the output 0.15 from fp32's (relative L2, worst
    input 0.32), these 0.06 (worst 0.09)."""
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer.utils.tfl_interpreter_utils import get_signature_main_subgraph_index
    with warnings.catch_warnings():  # "for debugging": calibration is what it is for
        warnings.simplefilter("ignore")
        it = Interpreter(str(path), experimental_preserve_all_tensors=True)
    ranges: dict[str, dict[str, np.ndarray]] = {}
    done, total = 0, sum(len(v) for v in data.values())
    for key, items in data.items():
        graph = get_signature_main_subgraph_index(it, key)
        index = {d["name"]: d["index"] for d in it.get_tensor_details(graph)}
        wanted = [(n, index[n]) for n, qsv in template.items() if "min" in qsv and n in index]
        runner = it.get_signature_runner(key)
        for feed in items:
            runner(**feed)
            for name, i in wanted:
                x = it.get_tensor(i, graph)
                if x.dtype.kind == "f" and x.size:
                    merge_ranges(ranges, {name: {
                        "min": np.full_like(template[name]["min"], x.min()),
                        "max": np.full_like(template[name]["max"], x.max())}})
            done += 1
            if done % 8 == 0 or done == total:
                say(f"  calibrated {done}/{total} UNet inputs")
    return {**template, **ranges}


def merge_ranges(into: dict[str, dict[str, np.ndarray]],
                 new: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Widen `into`'s per-tensor min/max by another input's (in place); a tensor new to
    `into` is copied in."""
    for name, qsv in new.items():
        have = into.get(name)
        if have is None:
            into[name] = {k: np.array(v, copy=True) for k, v in qsv.items()}
            continue
        have["min"] = np.minimum(have["min"], qsv["min"])
        have["max"] = np.maximum(have["max"], qsv["max"])


def float_ops(path: Path) -> list[str]:
    """The op types of the TFLite model at `path` that still make float outputs, the
    DEQUANTIZE of its outputs aside (sorted, each once)."""
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(str(path))
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ends = {d["index"] for d in it.get_output_details()}
    return sorted({op["op_name"] for op in it._get_ops_details()
                   if any(tensors[i]["dtype"].__name__.startswith("float")
                          for i in op["outputs"] if i in tensors)
                   and not (op["op_name"] == "DEQUANTIZE" and set(op["outputs"]) <= ends)})


def check_calibration_fits(path: Path) -> None:
    """Calibration runs the fp32 UNet with every tensor kept: refuse, before it runs, a
    UNet whose tensors would not fit in the memory available (SD 1.5 at 512x512: ~12 GB),
    rather than be killed for it."""
    from ai_edge_litert.interpreter import Interpreter
    from edge_sdk.estimate import available_bytes
    have = available_bytes()
    if have is None:
        return
    it = Interpreter(str(path))
    need = max(sum(int(np.prod(t["shape"])) * np.dtype(t["dtype"]).itemsize
                   for t in it.get_tensor_details(graph))
               for graph in range(it.num_subgraphs()))
    if need > have:
        raise ConversionError(f"int8-full: calibration keeps every tensor of one UNet call, "
                              f"{need / 1e9:.1f} GB for {path.name}, and {have / 1e9:.1f} GB "
                              "are available; convert at smaller --sizes, on a machine with "
                              "more memory, or use ONNX --precision w8a8 (its calibration "
                              "is streamed)")
