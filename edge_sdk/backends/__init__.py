"""Inference backends behind one tiny protocol: input specs, output specs, `run(feeds)`."""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from .. import contracts as C
from ..errors import BackendUnavailableError, BundleError, InferenceError, InvalidInputError
from ..manifest import ComponentSpec, TensorSpec
from . import plugins

log = logging.getLogger(__name__)

__all__ = ["Session", "BackendOptions", "open_session", "select_providers"]


class Session(Protocol):
    """One loaded model component."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(self, feeds: Mapping[str, np.ndarray],
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The outputs named (None: the contract's required ones) for `feeds`."""
        ...


@dataclass(frozen=True)
class BackendOptions:
    """How sessions are created. `None` means the backend's default."""

    backend: str = "auto"  # "auto" (each component's own format) | "onnx" | "tflite"
    threads: int | None = None  # intra-op threads; None = all cores
    providers: tuple[str, ...] | None = None  # ONNX Runtime execution providers, in order
    low_memory: bool = False  # keep weights mapped, skip memory-hungry rewrites
    delegate: str | None = None  # TFLite external delegate library (.so), e.g. a vendor NPU's
    delegate_options: tuple[tuple[str, str], ...] = ()  # passed to that delegate
    # passed to the plugin execution providers (QNN: e.g. soc_model, htp_performance_mode)
    provider_options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def checked(cls, backend: Any = "auto", threads: Any = None, providers: Any = None,
                low_memory: bool = False, delegate: Any = None,
                delegate_options: Any = None, provider_options: Any = None
                ) -> "BackendOptions":
        """The options from a caller's arguments, each checked: a typed error for a wrong
        type, and more threads than usable cores capped (with a warning): extra threads on
        busy cores only slow every one down (32 on 2 cores ran 4.8x slower than 2)."""
        if not isinstance(backend, str) or backend not in BACKENDS:
            raise InvalidInputError(f"backend {backend!r} is unknown; choose one of "
                                    f"{list(BACKENDS)}")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) \
                    or threads < 1:
                raise InvalidInputError(f"threads must be a positive integer, got {threads!r}")
            threads = int(threads)
            cores = usable_cores()
            if threads > cores:
                log.warning("threads=%d exceeds the %d usable cores; using %d", threads, cores,
                            cores)
                threads = cores
        if isinstance(providers, str):  # one name, not a sequence of letters
            providers = [p for p in providers.split(",") if p.strip()]
        if providers is not None and (not isinstance(providers, (list, tuple))
                                      or not all(isinstance(p, str) for p in providers)):
            raise InvalidInputError(f"providers must be a list of execution provider names, "
                                    f"got {providers!r}")
        if delegate is not None and not isinstance(delegate, (str, os.PathLike)):
            raise InvalidInputError(f"delegate must be a path to a .so, got {delegate!r}")
        for what, given in (("delegate_options", delegate_options),
                            ("provider_options", provider_options)):
            if given is not None and not isinstance(given, Mapping):
                raise InvalidInputError(f"{what} must be a mapping of option names to "
                                        f"values, got {given!r}")
        if provider_options and not any(plugins.plugin(provider_name(p.strip()))
                                        for p in providers or ()):
            raise InvalidInputError("provider_options are for a plugin execution provider "
                                    f"({', '.join(sorted(plugins.PLUGINS))}), and none was "
                                    "asked for; add providers=['qnn'] (--providers qnn)")
        return cls(backend, threads, tuple(p.strip() for p in providers) if providers else None,
                   low_memory, str(delegate) if delegate else None,
                   tuple((str(k), str(v)) for k, v in (delegate_options or {}).items()),
                   tuple((str(k), str(v)) for k, v in (provider_options or {}).items()))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def user_cache_dir() -> Path:
    """The user's cache folder for what the backends compile once and reuse (packed
    weights, NPU graphs): $EDGE_SDK_CACHE_DIR, default ~/.cache/edge-sdk (RuntimeError
    where there is no home folder)."""
    return Path(os.environ.get("EDGE_SDK_CACHE_DIR") or Path.home() / ".cache" / "edge-sdk")


BACKENDS = ("auto", "onnx", "tflite")
# the kinds a named backend must run; helpers (decoder stages, the VAE encoder) may be stored
# in another format in a mixed bundle
_MAIN_KINDS = (C.TEXT_ENCODER.kind, C.UNET.kind, C.VAE_DECODER.kind)


def open_session(bundle: Path, spec: ComponentSpec, options: BackendOptions,
                 weights: Mapping[str, np.ndarray] | None = None) -> Session:
    """Load `spec` from `bundle` with the backend of its format. A backend named in the
    options must be the format of the bundle's main components (text encoder, UNet, VAE
    decoder); helper components (decoder stages, the VAE encoder) may be stored in another
    format in a mixed bundle and run on their own. `weights`: initializers that replace the
    graph's (ONNX only: a load-time LoRA's)."""
    if options.backend not in BACKENDS:
        raise InvalidInputError(f"backend {options.backend!r} is unknown; choose one of "
                                f"{list(BACKENDS)}")
    _check_format(spec, options)  # providers and delegate: checked by the session itself
    if options.delegate and spec.format != "tflite":
        log.debug("%s is %s: the TFLite delegate does not apply", spec.name, spec.format)
    if spec.format == "tflite":
        if weights:
            raise InvalidInputError(f"{spec.name} is TFLite: its weights cannot be replaced "
                                    "at load time")
        from .litert import LiteRTSession
        return LiteRTSession(bundle / spec.path, spec, options)
    from .onnx import OnnxSession
    return OnnxSession(bundle / spec.path, spec, options, weights)


def _check_format(spec: ComponentSpec, options: BackendOptions) -> None:
    if options.backend != "auto" and spec.format != options.backend \
            and spec.kind in _MAIN_KINDS:
        raise BundleError(f"component {spec.name!r} is stored as {spec.format!r} but backend "
                          f"{options.backend!r} was requested; use backend='auto' or convert "
                          f"with `edge-convert --format {options.backend}`")


def check_backend(spec: ComponentSpec, options: BackendOptions) -> None:
    """What opening `spec` would refuse about the backend options, checked without loading
    it: the format, the execution providers asked for, the delegate library's presence."""
    _check_format(spec, options)
    if spec.format == "onnx" and options.providers:
        import onnxruntime as ort
        select_providers(options.providers, ort.get_available_providers())
    if spec.format == "tflite" and options.delegate and not Path(options.delegate).is_file():
        raise BackendUnavailableError(f"delegate library {options.delegate!r} does not exist; "
                                      "install the vendor's TFLite delegate and give the path "
                                      "to its .so")


def prepare_feeds(spec: ComponentSpec, feeds: Mapping[str, np.ndarray]
                  ) -> dict[str, np.ndarray]:
    """`feeds` as the component's inputs want them (contiguous, the manifest's dtypes)."""
    cast = {}
    for t in spec.inputs:
        if t.name not in feeds:
            raise InferenceError(f"{spec.name}: input {t.name!r} was not given")
        cast[t.name] = np.ascontiguousarray(feeds[t.name], dtype=t.dtype)
    return cast


def output_names(spec: ComponentSpec, outputs: Sequence[str] | None) -> list[str]:
    """The outputs a run fetches: those asked for, or the contract's required ones (an
    optional output, such as the UNet's deep features, costs a copy only when asked)."""
    have = [o.name for o in spec.outputs]
    if outputs is None:
        optional = {t.name for t in C.contract_of(spec.kind).outputs if t.optional}
        return [n for n in have if n not in optional]
    missing = [n for n in outputs if n not in have]
    if missing:
        raise InferenceError(f"{spec.name}: the graph has no output {missing} (it has "
                             f"{have}); re-convert the bundle")
    return list(outputs)


def check_io(spec: ComponentSpec, what: str, got_in: set[str], got_out: set[str]) -> None:
    """The loaded model's input and output names against the manifest's contract."""
    want_in, want_out = {t.name for t in spec.inputs}, {t.name for t in spec.outputs}
    if got_in != want_in or not want_out <= got_out:
        raise BundleError(f"{spec.path}: {what} inputs {sorted(got_in)} / outputs "
                          f"{sorted(got_out)} do not match the manifest ({sorted(want_in)} / "
                          f"{sorted(want_out)}); re-convert the bundle")


PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider", "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider", "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider", "cann": "CANNExecutionProvider",
    "openvino": "OpenVINOExecutionProvider", "cuda": "CUDAExecutionProvider"}


def provider_name(name: str) -> str:
    """An execution provider's full name from its short one ("qnn"), or as given."""
    return PROVIDER_ALIASES.get(name.lower(), name)


def select_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The execution providers to use, in order, always ending with the CPU one.

    A requested provider that is not available is an error (not a silent fallback): the
    caller asked for specific hardware. A plugin EP (edge_sdk.backends.plugins: QNN,
    OpenVINO) is never in `available`: its library is registered here when it is asked for.
    """
    chosen: list[str] = []
    for name in requested or ():
        full = provider_name(name)
        if full not in available and plugins.plugin(full) is not None:
            plugins.devices(full)  # a plugin EP: registered, or a typed error naming it
        elif full not in available:
            raise BackendUnavailableError(
                f"execution provider {name!r} is not available in this onnxruntime build "
                f"(available: {list(available)}); install the onnxruntime package built for "
                "that hardware")
        if full not in chosen:
            chosen.append(full)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    log.debug("onnxruntime execution providers: %s", chosen)
    return chosen
