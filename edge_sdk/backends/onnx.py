"""ONNX Runtime backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..contracts import COMPUTE_BOUND_KINDS
from ..errors import BackendUnavailableError, BundleError, InferenceError
from ..manifest import ComponentSpec
from ..names import VAE_DECODER_TINY
from . import BackendOptions, check_io, output_names, plugins, prepare_feeds, select_providers
from .npu import runs_on_npu
from .onnx_files import check_external_data

log = logging.getLogger(__name__)



class OnnxSession:
    """An onnxruntime InferenceSession checked against the manifest's I/O contract."""

    def __init__(self, path: Path, spec: ComponentSpec, options: BackendOptions,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise BackendUnavailableError("onnxruntime is not installed; `pip install "
                                          "onnxruntime`") from exc
        self.spec = spec
        self.inputs, self.outputs = spec.inputs, spec.outputs
        # the process-wide logger too: some warnings come before the session's own level
        # applies, as coloured lines beside the typed error that follows
        ort.set_default_logger_severity(3)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only; ORT warnings are not the user's business
        if options.threads:
            so.intra_op_num_threads = options.threads
        # Each session has its own thread pool, and by default its idle threads spin for a
        # while after every run, taking the cores from the next stage's session: on 2 cores
        # the shipped models' UNet steps ran at half speed after the text encoder, and the
        # decoder after the UNet (shapes-lcm: 174 -> 75 ms per image with spinning off, the
        # 20-step shapes model 741 -> 523 ms, measured side by side on 2 cores).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if options.low_memory and spec.kind not in COMPUTE_BOUND_KINDS:
            so.enable_cpu_mem_arena = False
            # Weights stay in the page cache (mapped external data) instead of being copied:
            # prepacking and the layout-rewriting optimizations (EXTENDED and above) copy them
            # into private memory (measured on 570 MB of weights: ~600 MB private after load
            # with the defaults, ~50 MB with these settings).
            so.add_session_config_entry("session.disable_prepacking", "1")
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if spec.name == VAE_DECODER_TINY:
            # A tiny decoder's memory is its full-resolution activations, its compute small:
            # without the arena each is freed as soon as it is used up, instead of the arena
            # keeping its largest extent (TAESD at 512x512: peak private 505 -> 245 MiB, decode
            # 1.39 -> 1.35 s; tests/bench/few_step.py).
            so.enable_cpu_mem_arena = False
        check_external_data(path, {f.path for f in spec.files})
        if weights:
            # above BASIC, ORT's rewrites may replace a weight before the one given here
            # would: on fp16 graphs they were silently ignored (measured: no change at all)
            level = ort.GraphOptimizationLevel
            if so.graph_optimization_level not in (level.ORT_DISABLE_ALL, level.ORT_ENABLE_BASIC):
                so.graph_optimization_level = level.ORT_ENABLE_BASIC
        # replaced weights are used in place (the OrtValues wrap the arrays, which must
        # outlive the session), so memory grows by these tensors only
        self._weights = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a))
                         for a in (weights or {}).values()]
        for name, value in zip(weights or {}, self._weights):
            so.add_initializer(name, value)
        self.providers, self._session = _create(ort, path, spec, so, options)
        self._check_io()
        self._batch = _static_batch(self._session)

    def _check_io(self) -> None:
        check_io(self.spec, "graph", {i.name for i in self._session.get_inputs()},
                 {o.name for o in self._session.get_outputs()})

    def run(self, feeds: Mapping[str, np.ndarray],
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        cast = prepare_feeds(self.spec, feeds)
        names = output_names(self.spec, outputs)
        batch = len(next(iter(cast.values()))) if cast else 0
        step = self._batch if self._batch and batch > self._batch \
            and batch % self._batch == 0 else batch
        parts: list[list[np.ndarray]] = []
        try:
            for i in range(0, max(batch, 1), max(step, 1)):  # a static-batch graph: in parts
                parts.append(self._session.run(
                    names, {k: v[i:i + step] for k, v in cast.items()} if step < batch
                    else cast))
        except Exception as exc:
            shapes = {k: v.shape for k, v in cast.items()}
            raise InferenceError(f"{self.spec.name}: onnxruntime failed on inputs {shapes}: "
                                 f"{str(exc).strip()[:300]}") from exc
        if len(parts) == 1:
            return dict(zip(names, parts[0]))
        return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


def _create(ort: Any, path: Path, spec: ComponentSpec, so: Any, options: BackendOptions
            ) -> tuple[list[str], Any]:
    """(the providers the session uses, the session): an NPU provider takes only the
    statically quantized components (the rest runs on the CPU beside it); plugin EPs are
    added by device (edge_sdk.backends.npu), compiled-in ones by name."""
    available = ort.get_available_providers()
    providers = select_providers(options.providers, available)
    if not runs_on_npu(spec) and any(plugins.is_npu(p) for p in providers):
        log.info("%s is %s: the NPU runs statically quantized graphs; it runs on the CPU",
                 spec.name, spec.precision)
        providers = [p for p in providers if not plugins.is_npu(p)]
    # an EP compiled into this onnxruntime build (onnxruntime-qnn 1.x on Windows) is taken by
    # name, as before plugins, when its plugin package is not installed (a registered plugin
    # is listed as available too, but taken by name it silently ran on the CPU: measured)
    if any(plugins.plugin(p) and (plugins.installed(p) or p not in available)
           for p in providers):
        from .npu import plugin_session
        session = plugin_session(ort, path, spec, so, providers,
                                 dict(options.provider_options))
    else:
        session = _open(ort, path, so, providers)
    return list(session.get_providers()), session


def _open(ort: Any, path: Path, so: Any, providers: list[str]) -> Any:
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidProtobuf...)
        raise BundleError(f"{path}: onnxruntime cannot load it ({type(exc).__name__}: "
                          f"{str(exc).strip()[:300]}); the file is corrupted or was not "
                          "written by edge-convert — re-convert or copy the bundle again"
                          ) from exc


def _static_batch(session: Any) -> int | None:
    """The batch of a graph whose inputs all have the same fixed first dimension (an NPU's
    graph, compiled for batch 1); None when the batch is dynamic."""
    dims = [i.shape[0] if i.shape else None for i in session.get_inputs()]
    return dims[0] if dims and all(isinstance(d, int) and d == dims[0] for d in dims) else None
