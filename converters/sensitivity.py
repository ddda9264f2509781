"""Per-layer fallback for static QDQ (`--target-psnr DB`): the layers whose quantization hurts
most are kept float until the UNet's output holds the target on calibration inputs.

Sensitivity is measured where it arises, in one pass: for every quantized activation of the
QDQ graph, the signal-to-quantization-noise ratio between the tensor and its
quantize-dequantize (onnxruntime's "qdq_err"). The tensors are ranked worst first, and the
nodes that make and use the 1, 2, 4 ... worst are left float, the graph re-quantized and its
output compared with the fp32 graph's, until the PSNR holds (or every quantized tensor is
float). The PSNR is of the UNet's output (the predicted noise) against the fp32 graph's,
over the inputs given: 10 log10(range^2 / MSE), range = the fp32 output's max - min.
The ranking holds every quantized activation of one call at once (with its dequantized
twin): fine for the small models, ~2x a call's activations for SD 1.5 (not bounded yet).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

Feeds = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class Fallback:
    """What the search kept float and what it reached."""

    nodes: tuple[str, ...]  # node names left float beyond the fixed ones
    psnr: float  # the UNet output's PSNR against fp32 with them float
    first_psnr: float  # with none of them float
    target: float


def output_psnr(reference: Sequence[np.ndarray], graph: Path, feeds: Feeds) -> float:
    """PSNR (dB) of `graph`'s first output against `reference` (one array a feed)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    err = rng = 0.0
    lo, hi = np.inf, -np.inf
    for feed, want in zip(feeds, reference):
        got = sess.run(None, dict(feed))[0]
        err += float(np.sum((got.astype(np.float64) - want) ** 2))
        rng += want.size
        lo, hi = min(lo, float(want.min())), max(hi, float(want.max()))
    mse = err / max(rng, 1)
    return float("inf") if mse == 0 else 10 * float(np.log10((hi - lo) ** 2 / mse))


def run_outputs(graph: Path, feeds: Feeds) -> list[np.ndarray]:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    return [sess.run(None, dict(f))[0].astype(np.float64) for f in feeds]


def ranked_tensors(qdq: Path, scratch: Path, feeds: Feeds) -> list[str]:
    """The quantized activations of the QDQ graph `qdq`, worst SQNR first."""
    import onnx
    from onnx import helper
    model = onnx.load(str(qdq), load_external_data=False)
    consts = {i.name for i in model.graph.initializer}
    pairs: dict[str, str] = {}  # quantized tensor -> its dequantized twin
    q_out = {n.output[0]: n.input[0] for n in model.graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_out:
            pairs.setdefault(q_out[n.input[0]], n.output[0])
    names = {o.name for o in model.graph.output}
    for name in [t for kv in pairs.items() for t in kv if t not in names]:
        model.graph.output.append(helper.make_empty_tensor_value_info(name))
    aug = scratch / "sensitivity.onnx"
    onnx.save(model, str(aug))  # beside the QDQ graph: its weights' file is shared
    import onnxruntime as ort
    sess = ort.InferenceSession(str(aug), providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    signal: dict[str, float] = dict.fromkeys(pairs, 0.0)
    noise: dict[str, float] = dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        got = dict(zip(outs, sess.run(None, dict(feed))))
        for t, dq in pairs.items():
            x, y = got[t].astype(np.float64), got[dq].astype(np.float64)
            signal[t] += float(np.sum(x * x))
            noise[t] += float(np.sum((x - y) ** 2))
    aug.unlink()
    sqnr = {t: 10 * np.log10(max(signal[t], 1e-30) / max(noise[t], 1e-30)) for t in pairs}
    return sorted(pairs, key=lambda t: sqnr[t])


def nodes_of(graph: Path, tensors: Sequence[str]) -> list[str]:
    """The float graph's nodes that make or use `tensors` (named, in graph order)."""
    import onnx
    wanted = set(tensors)
    model = onnx.load(str(graph), load_external_data=False)
    return [n.name for n in model.graph.node
            if n.name and (wanted & set(n.input) or wanted & set(n.output))]


def search(graph: Path, quantize: Callable[[tuple[str, ...]], Path], feeds: Feeds,
           target: float, say: Callable[[str], None]) -> Fallback:
    """Leave float the nodes around the worst-quantized tensors, doubling their number,
    until the output PSNR reaches `target`. `quantize(extra_float_nodes)` writes the QDQ
    graph and returns its path."""
    reference = run_outputs(graph, feeds)
    qdq = quantize(())  # each in a folder of its own, removed once measured
    first = output_psnr(reference, qdq, feeds)
    say(f"  output PSNR {first:.1f} dB with every layer quantized (target {target:.1f} dB)")
    if first >= target:
        return Fallback((), first, first, target)
    ranked = ranked_tensors(qdq, qdq.parent, feeds)
    shutil.rmtree(qdq.parent, ignore_errors=True)
    k, psnr, nodes = 1, first, ()
    while True:
        nodes = tuple(nodes_of(graph, ranked[:k]))
        trial = quantize(nodes)
        psnr = output_psnr(reference, trial, feeds)
        shutil.rmtree(trial.parent, ignore_errors=True)
        say(f"  {len(nodes)} layers float (around the {k} worst tensors): {psnr:.1f} dB")
        if psnr >= target or k >= len(ranked):
            break
        k = min(2 * k, len(ranked))
    if psnr < target:
        log.warning("target PSNR %.1f dB not reached (%.1f dB with every quantized tensor "
                    "float)", target, psnr)
    return Fallback(nodes, psnr, first, target)
