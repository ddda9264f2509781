"""Plugin execution providers: vendor packages that ship an EP library for a stock onnxruntime.

`onnxruntime-qnn` (Qualcomm's HTP NPU) and `onnxruntime-ep-openvino` (Intel) are not compiled
into onnxruntime: their library is registered with the process once, and their devices are
then found through `get_ep_devices()` — `get_available_providers()` never lists them. A
session takes them with `SessionOptions.add_provider_for_devices`, not `providers=[...]`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import platform
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import BackendUnavailableError

log = logging.getLogger(__name__)

QNN = "QNNExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"

# The SoC the QNN HTP emulator of onnxruntime-qnn's x86-64 wheel compiles for when none is
# named: without one, finalizing our UNets failed (QNN_COMMON_ERROR_MEM_ALLOC); with "60"
# they compile and run. On a device the EP reads the SoC itself, so this is never set there.
EMULATOR_SOC_MODEL = "60"


@dataclass(frozen=True)
class Plugin:
    """One plugin EP: its name, the module that locates its library, how to install it."""

    ep_name: str
    module: str
    install: str  # what a user runs to get it
    # the EP options we set when the caller does not (the module is passed in)
    defaults: Callable[[Any], dict[str, str]]
    npu: bool  # runs statically quantized graphs only: other components stay on the CPU


def _qnn_defaults(mod: Any) -> dict[str, str]:
    # the graph inputs' quantization on the HTP too (its default leaves it to the CPU)
    opts = {"backend_path": mod.get_qnn_htp_path(), "offload_graph_io_quantization": "0"}
    if platform.machine().lower() in ("x86_64", "amd64"):  # the HTP emulator
        opts["soc_model"] = EMULATOR_SOC_MODEL
    return opts


def _openvino_defaults(mod: Any) -> dict[str, str]:
    return {}  # its device is chosen by get_ep_devices (the first: the CPU here)


PLUGINS: dict[str, Plugin] = {
    QNN: Plugin(QNN, "onnxruntime_qnn", "pip install 'edge-sdk-diffusion[qnn]' "
                "(onnxruntime-qnn)", _qnn_defaults, npu=True),
    OPENVINO: Plugin(OPENVINO, "onnxruntime_ep_openvino", "pip install "
                     "'edge-sdk-diffusion[openvino]' (onnxruntime-ep-openvino)",
                     _openvino_defaults, npu=False),
}

_registered: set[str] = set()
_lock = threading.Lock()


def plugin(ep_name: str) -> Plugin | None:
    """The plugin of `ep_name`, or None for a provider compiled into onnxruntime."""
    return PLUGINS.get(ep_name)


def is_npu(ep_name: str) -> bool:
    """Whether `ep_name` runs statically quantized graphs only (an NPU)."""
    p = PLUGINS.get(ep_name)
    return bool(p and p.npu)


def devices(ep_name: str) -> list[Any]:
    """The `OrtEpDevice`s of a plugin EP, its library registered first (once a process).
    A missing package or a library that finds no device is a BackendUnavailableError."""
    import onnxruntime as ort
    p = PLUGINS[ep_name]
    mod = _module(p)
    with _lock:
        if ep_name not in _registered:
            if not hasattr(ort, "register_execution_provider_library"):
                raise BackendUnavailableError(
                    f"{ep_name} is a plugin execution provider, and onnxruntime "
                    f"{ort.__version__} cannot load plugins; upgrade onnxruntime (>= 1.23)")
            try:
                ort.register_execution_provider_library(ep_name, _library(p, mod))
            except Exception as exc:  # ORT raises its own types
                raise BackendUnavailableError(f"{ep_name}: its library did not load "
                                              f"({str(exc).strip()[:200]})") from exc
            _registered.add(ep_name)
    found = [d for d in ort.get_ep_devices() if d.ep_name == ep_name]
    if not found:
        raise BackendUnavailableError(f"{ep_name} is installed but reports no device on this "
                                      "machine")
    return found


def options(ep_name: str, given: Mapping[str, str]) -> dict[str, str]:
    """The EP's options: ours (e.g. QNN's HTP backend) overridden by the caller's."""
    p = PLUGINS[ep_name]
    return {**p.defaults(_module(p)), **{str(k): str(v) for k, v in given.items()}}


def installed(ep_name: str) -> bool:
    """Whether the plugin's package can be imported (nothing is registered)."""
    return importlib.util.find_spec(PLUGINS[ep_name].module) is not None


def _module(p: Plugin) -> Any:
    try:
        return importlib.import_module(p.module)
    except ImportError as exc:
        raise BackendUnavailableError(f"execution provider {p.ep_name} needs the "
                                      f"{p.module} package, which is not installed: "
                                      f"{p.install}") from exc


def _library(p: Plugin, mod: Any) -> str:
    getter = getattr(mod, "get_library_path", None)
    if getter is None:
        raise BackendUnavailableError(f"{p.module} does not say where its EP library is "
                                      "(no get_library_path); install a newer version")
    return str(getter())
