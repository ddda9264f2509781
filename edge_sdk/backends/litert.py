"""LiteRT (TFLite) backend: `ai-edge-litert`, or `tflite-runtime` as the fallback.

With ai-edge-litert and no external delegate a component runs as a LiteRT `CompiledModel` on
the CPU (XNNPACK) with an XNNPACK weight cache: XNNPACK repacks every weight for its kernels,
and without the cache those copies live in private memory (as much again as the model); with
it they are written once to a cache file and mapped from then on, so a loaded UNet is mostly
page cache (shareable, evictable). An external delegate (a vendor NPU's `.so`) goes through
the classic `Interpreter`, as does tflite-runtime.

TFLite shapes are static: a sized component holds one signature per exported size and every
signature has batch 1; `run` picks the signature that fits and runs a batch image by image.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
from importlib import util as _import_util
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import BackendUnavailableError, BundleError, InferenceError, InvalidInputError
from ..manifest import ComponentSpec
from . import BackendOptions, check_io, output_names, prepare_feeds, user_cache_dir

log = logging.getLogger(__name__)

LITERT = "ai-edge-litert"
TFLITE_RUNTIME = "tflite-runtime"


def load_runtime() -> tuple[str, Any]:
    """(package name, its interpreter module): ai-edge-litert, else tflite-runtime."""
    try:
        from ai_edge_litert import interpreter
        return LITERT, interpreter
    except ImportError:
        pass
    if _import_util.find_spec("tflite_runtime") is None:
        raise BackendUnavailableError("the TFLite backend needs LiteRT: `pip install "
                                      "ai-edge-litert` (or the [tflite] extra)")
    if int(np.__version__.split(".")[0]) >= 2:
        raise BackendUnavailableError(
            f"tflite-runtime is installed but cannot run with numpy {np.__version__} (it needs "
            "numpy < 2); `pip install ai-edge-litert` instead (preferred), or "
            "`pip install 'numpy<2'`")
    try:
        from tflite_runtime import interpreter  # type: ignore[import-not-found]
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailableError(f"tflite-runtime failed to load ({exc}); `pip install "
                                      "ai-edge-litert` instead") from exc
    return TFLITE_RUNTIME, interpreter


class LiteRTSession:
    """A `.tflite` component behind the backend protocol (inputs, outputs, run)."""

    def __init__(self, path: Path, spec: ComponentSpec, options: BackendOptions) -> None:
        self.spec = spec
        self.inputs, self.outputs = spec.inputs, spec.outputs
        runtime, module = load_runtime()
        try:
            if runtime == LITERT and not options.delegate and _has_compiled_model():
                sha = next((f.sha256 for f in spec.files if f.path == spec.path), "")
                self._engine: Any = _Compiled(path, options.threads,
                                              weight_cache_file(path, sha))
            else:
                self._engine = _Interpreted(module, path, options)
        except BackendUnavailableError:
            raise
        except Exception as exc:  # the runtimes raise RuntimeError/ValueError of their own
            raise BundleError(f"{path}: {runtime} cannot load it ({type(exc).__name__}: "
                              f"{str(exc).strip()[:300]}); the file is corrupted or was not "
                              "written by edge-convert — re-convert or copy the bundle again"
                              ) from exc
        log.debug("%s: %s (%s), signatures %s", spec.name, runtime, self._engine.kind,
                  list(self._engine.signatures))
        self._check_io()

    def _check_io(self) -> None:
        for key, (ins, outs) in self._engine.signatures.items():
            check_io(self.spec, f"signature {key!r}", set(ins), set(outs))

    def run(self, feeds: Mapping[str, np.ndarray],
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        cast = prepare_feeds(self.spec, feeds)
        key, step = self._signature_for(cast)
        batch = next(iter(cast.values())).shape[0]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in output_names(self.spec, outputs)}
        try:
            for i in range(0, batch, step):
                out = self._engine.run(key, {k: v[i:i + step] for k, v in cast.items()})
                for name in parts:
                    parts[name].append(out[name])
        except Exception as exc:
            shapes = {k: v.shape for k, v in cast.items()}
            raise InferenceError(f"{self.spec.name}: LiteRT failed on inputs {shapes}: "
                                 f"{str(exc).strip()[:300]}") from exc
        return {k: v[0] if len(v) == 1 else np.concatenate(v) for k, v in parts.items()}

    def _signature_for(self, feeds: Mapping[str, np.ndarray]) -> tuple[str, int]:
        """The signature whose static shapes fit `feeds` (batch: a multiple of its own)."""
        for key, (ins, _) in self._engine.signatures.items():
            step = next(iter(ins.values()))[0] or 1
            if all(v.shape[1:] == tuple(ins[k][1:]) and v.shape[0] % step == 0
                   for k, v in feeds.items()):
                return key, step
        sizes = [tuple(ins[k][1:]) for ins, _ in self._engine.signatures.values()
                 for k in ins][:8]
        got = {k: v.shape for k, v in feeds.items()}
        raise InvalidInputError(f"{self.spec.name}: this TFLite model has static shapes and "
                                f"none fits {got} (it takes {sizes}); generate at a size it "
                                "was exported for, or re-convert with `edge-convert --format "
                                "tflite --sizes WxH,...`")


def _has_compiled_model() -> bool:
    """Whether CompiledModel can run here. ai-edge-litert 1.x has only the Interpreter; and
    the 2.x aarch64 wheel's libLiteRt is built with LSE atomics (ARMv8.1): on ARMv8.0 cores
    (Raspberry Pi 3, 4 and Zero 2: Cortex-A53/A72) it dies of SIGILL at load, which no
    exception can catch, while its Interpreter runs. Those use the Interpreter (weights
    repacked in private memory)."""
    if _import_util.find_spec("ai_edge_litert.compiled_model") is None:
        return False
    if platform.machine().lower() in ("aarch64", "arm64") and not _arm_has_atomics():
        log.info("this ARM core lacks LSE atomics (ARMv8.0): LiteRT's CompiledModel cannot "
                 "run on it; using its Interpreter")
        return False
    return True


def _arm_has_atomics() -> bool:
    """HWCAP_ATOMICS from the kernel's auxiliary vector (not /proc/cpuinfo, which emulators
    and containers may rewrite); True where it cannot be read, as on macOS (ARMv8.5+)."""
    import ctypes
    try:
        getauxval = ctypes.CDLL(None).getauxval
    except (OSError, AttributeError):
        return True
    getauxval.restype, getauxval.argtypes = ctypes.c_ulong, (ctypes.c_ulong,)
    return bool(getauxval(_AT_HWCAP) & _HWCAP_ATOMICS)


_AT_HWCAP, _HWCAP_ATOMICS = 16, 1 << 8  # <sys/auxv.h>, arm64 <asm/hwcap.h>


def weight_cache_file(model: Path, sha256: str) -> str | None:
    """Where XNNPACK's packed weights for `model` go: a file per model content (the
    manifest's sha256, and the file's size and mtime in case it changed without a checksum
    check), runtime version and CPU architecture under $EDGE_SDK_CACHE_DIR (default
    ~/.cache/edge-sdk). None (no cache: weights repacked in private memory) when it cannot
    be written."""
    try:
        st = model.stat()
    except OSError:
        return None
    if not sha256:
        return None
    try:
        from importlib.metadata import version
        runtime = version(LITERT)
    except Exception:  # noqa: BLE001 - metadata missing: no cache rather than a stale one
        return None
    folder = user_cache_dir() / "xnnpack"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("no XNNPACK weight cache (%s): weights are repacked in private memory; "
                    "set EDGE_SDK_CACHE_DIR to a writable folder", exc)
        return None
    stamp = f"{st.st_size}-{st.st_mtime_ns}"
    return str(folder / f"{sha256[:32]}-{stamp}-{runtime}-{platform.machine()}.xnn")


class _Compiled:
    """LiteRT's CompiledModel on the CPU, weights packed into a mapped cache file."""

    kind = "CompiledModel, XNNPACK"

    def __init__(self, path: Path, threads: int | None, cache: str | None) -> None:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import CpuOptions, Options
        fresh = cache is not None and not os.path.exists(cache)
        # a new cache is written under a private name and renamed when complete, so that a
        # process starting meanwhile never maps a half-written one
        target = f"{cache}.{os.getpid()}.tmp" if fresh else cache
        opts = Options(hardware_accelerators=HardwareAccelerator.CPU,
                       cpu_options=CpuOptions(num_threads=threads or os.cpu_count() or 1,
                                              xnnpack_weight_cache_path=target or ""))
        with _native_log_to_debug():
            self._model = CompiledModel.from_file(str(path), environment=_environment(),
                                                  options=opts)
        if fresh and target and os.path.exists(target):
            os.replace(target, cache)  # type: ignore[arg-type]
        self.signatures: dict[str, tuple[dict[str, list[int]], dict[str, list[int]]]] = {}
        self._dtypes: dict[str, dict[str, np.dtype]] = {}
        for key in self._model.get_signature_list():
            ins = self._model.get_input_tensor_details(key)
            outs = self._model.get_output_tensor_details(key)
            self.signatures[key] = ({k: list(d["shape"]) for k, d in ins.items()},
                                    {k: list(d["shape"]) for k, d in outs.items()})
            self._dtypes[key] = {k: np.dtype(d["dtype"]) for k, d in outs.items()}
        self._buffers: dict[str, tuple[Any, Any]] = {}

    def run(self, key: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # the first run makes the buffers and sets up the accelerators, which log to stderr
        with _native_log_to_debug() if key not in self._buffers else contextlib.nullcontext():
            return self._run(key, feeds)

    def _run(self, key: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        index = self._model.get_signature_index(key)
        if key not in self._buffers:
            self._buffers[key] = (self._model.create_input_buffers(index),
                                  self._model.create_output_buffers(index))
        ins, outs = self._buffers[key]
        in_shapes, out_shapes = self.signatures[key]
        for name, buf in zip(in_shapes, ins):
            buf.write(feeds[name])
        self._model.run_by_index(index, ins, outs)
        result = {}
        for (name, shape), buf in zip(out_shapes.items(), outs):
            n = int(np.prod(shape))
            result[name] = buf.read(n, self._dtypes[key][name]).reshape(shape).copy()
        return result


class _Interpreted:
    """The classic Interpreter: for external delegates, and for tflite-runtime."""

    kind = "Interpreter"

    def __init__(self, module: Any, path: Path, options: BackendOptions) -> None:
        delegates = []
        if options.delegate:
            delegates.append(load_delegate(module, options.delegate,
                                           dict(options.delegate_options)))
        self._it = module.Interpreter(model_path=str(path),
                                      num_threads=options.threads or os.cpu_count() or 1,
                                      experimental_delegates=delegates or None)
        self._runners = {k: self._it.get_signature_runner(k)
                         for k in self._it.get_signature_list()}
        self.signatures = {
            k: ({n: list(d["shape"]) for n, d in r.get_input_details().items()},
                {n: list(d["shape"]) for n, d in r.get_output_details().items()})
            for k, r in self._runners.items()}

    def run(self, key: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self._runners[key](**feeds).items()}


def load_delegate(module: Any, library: str, options: dict[str, str]) -> Any:
    """An external delegate (`--delegate PATH.so --delegate-option k=v`), with a typed error
    naming what is missing."""
    if not os.path.isfile(library):
        raise BackendUnavailableError(f"delegate library {library!r} does not exist; install "
                                      "the vendor's TFLite delegate and give the path to its .so")
    _check_delegate_library(library)
    try:
        return module.load_delegate(library, options or None)
    except (ValueError, RuntimeError, OSError, AttributeError) as exc:
        raise BackendUnavailableError(f"delegate {library!r} failed to load ({exc}); check "
                                      "that it matches this machine and the delegate options "
                                      f"{options}") from exc


# what a TFLite external delegate library exports (external_delegate_interface.h)
DELEGATE_SYMBOLS = ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate")


def _check_delegate_library(library: str) -> None:
    """Load the library and look for the delegate entry points before LiteRT does: its
    Delegate object, when the library does not load, fails half-built and then prints a
    traceback from its finalizer beside our typed error."""
    import ctypes
    try:
        lib = ctypes.CDLL(library)
    except OSError as exc:
        raise BackendUnavailableError(f"delegate {library!r} failed to load ({exc}); check "
                                      "that it is a shared library built for this machine"
                                      ) from exc
    missing = [name for name in DELEGATE_SYMBOLS if not hasattr(lib, name)]
    if missing:
        raise BackendUnavailableError(f"{library!r} is not a TFLite external delegate: it "
                                      f"does not export {', '.join(missing)}; give the path to "
                                      "the vendor's TFLite delegate .so")


@contextlib.contextmanager
def _native_log_to_debug() -> Iterator[None]:
    """LiteRT's C++ side prints INFO lines (accelerator registry, plugins it could not find)
    straight to stderr; they go to this module's debug log instead."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().decode(errors="replace").splitlines():
                log.debug("litert: %s", line)


_ENV: list[Any] = []


def _environment() -> Any:
    """One LiteRT environment for the process (each model would otherwise make its own,
    registering every accelerator again). Its teardown at exit prints a line per accelerator
    to stderr; once it exists, stderr is silenced at exit (after Python's own exit work)."""
    if not _ENV:
        import atexit

        from ai_edge_litert.compiled_model import _create_default_environment
        with _native_log_to_debug():
            _ENV.append(_create_default_environment())
        atexit.register(_silence_native_teardown)
    return _ENV[0]


def _silence_native_teardown() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except OSError:
        pass
