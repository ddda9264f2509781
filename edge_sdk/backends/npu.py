"""Sessions on plugin execution providers, and the NPU's compiled-graph cache.

An NPU compiles a graph for itself when a session is created (QNN: a "context binary";
seconds for our small UNet, minutes for SD 1.5's on the emulator). The compiled graph is
kept beside the bundle (`<bundle>/.npu-cache/`, or under $EDGE_SDK_CACHE_DIR when the bundle
is read-only) and loaded instead the next time (measured on the shapes UNet under the HTP
emulator: 3.0 s to compile, 0.1 s to load the cached one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from ..errors import BackendUnavailableError
from ..manifest import ComponentSpec
from ..names import QDQ_PRECISIONS
from . import plugins, user_cache_dir

log = logging.getLogger(__name__)

CACHE_DIR = ".npu-cache"
_CONTEXT_FILE = "ctx.onnx"


def runs_on_npu(spec: ComponentSpec) -> bool:
    """Whether an NPU provider takes this component: statically quantized (QDQ) ONNX graphs;
    float and dynamically quantized ones run on the CPU beside it."""
    return spec.format == "onnx" and spec.precision in QDQ_PRECISIONS


def plugin_session(ort: Any, path: Path, spec: ComponentSpec, so: Any,
                   providers: list[str], given: Mapping[str, str]) -> Any:
    """An InferenceSession on the plugin EPs among `providers` (the CPU after them; the
    options `given` go to the first plugin EP). On an NPU the CPU fallback is disabled: a
    graph it cannot run whole is an error, not a slow half-CPU run."""
    eps = [p for p in providers if plugins.plugin(p) is not None]
    for name in providers:
        if name not in eps and name != "CPUExecutionProvider":
            log.warning("%s is not a plugin EP and cannot be combined with one; skipped", name)
    for name in eps:
        so.add_provider_for_devices(plugins.devices(name),
                                    plugins.options(name, given if name == eps[0] else {}))
    npu = next((p for p in eps if plugins.is_npu(p)), None)
    if npu is None:
        try:
            return ort.InferenceSession(str(path), so)
        except Exception as exc:  # ORT raises its own types
            raise BackendUnavailableError(
                f"{spec.name}: {eps[0]} could not load it ({type(exc).__name__}: "
                f"{str(exc).strip()[:300]}); try without --providers") from exc
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    key = _cache_key(ort, spec, npu, plugins.options(npu, given if npu == eps[0] else {}))
    try:
        return _cached(ort, path, spec, so, key) or _compile(ort, path, spec, so, key)
    except Exception as exc:  # ORT raises its own types
        raise BackendUnavailableError(
            f"{spec.name}: {npu} cannot run this graph whole with the CPU fallback disabled "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}); see which operators fall "
            "back with `edge-sdk info BUNDLE --providers qnn`, or convert for the NPU with "
            "`edge-convert --precision w8a16 --sizes WxH`") from exc


def _cached(ort: Any, path: Path, spec: ComponentSpec, so: Any, key: str) -> Any:
    """The session of the cached compiled graph, or None. One that does not load (another
    onnxruntime, a damaged file) is removed, to be compiled again."""
    for root in _cache_roots(path.parent):
        folder = root / f"{spec.name}-{key}"
        if not (folder / _CONTEXT_FILE).is_file():
            continue
        try:
            session = ort.InferenceSession(str(folder / _CONTEXT_FILE), so)
            log.info("%s: loading the compiled graph from %s", spec.name, folder)
            return session
        except Exception as exc:  # ORT raises its own types
            log.warning("%s: the cached compiled graph in %s does not load (%s); compiling "
                        "again", spec.name, folder, str(exc).strip()[:200])
            shutil.rmtree(folder, ignore_errors=True)
    return None


def _cache_key(ort: Any, spec: ComponentSpec, ep: str, options: Mapping[str, str]) -> str:
    """What the compiled graph depends on: the graph's files, the EP and its options, the
    plugin's and onnxruntime's versions, the CPU architecture. (Not the SoC: a compiled graph
    that does not load on another one is compiled again, see _cached.)"""
    import importlib.metadata as md
    import platform
    mod = plugins.PLUGINS[ep].module.replace("_", "-")
    try:
        version = md.version(mod)
    except md.PackageNotFoundError:
        version = "unknown"
    blob = json.dumps({"files": [(f.path, f.size, f.sha256) for f in spec.files], "ep": ep,
                       "options": dict(sorted(options.items())), "version": version,
                       "onnxruntime": ort.__version__, "machine": platform.machine()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_roots(bundle: Path) -> list[Path]:
    """Beside the bundle, then under $EDGE_SDK_CACHE_DIR (default ~/.cache/edge-sdk)."""
    roots = [bundle / CACHE_DIR]
    try:
        roots.append(user_cache_dir() / "npu" / hashlib.sha256(str(bundle.resolve()).encode())
                     .hexdigest()[:16])
    except RuntimeError:  # no home folder: beside the bundle only
        pass
    return roots


def _compile(ort: Any, path: Path, spec: ComponentSpec, so: Any, key: str) -> Any:
    """A session compiled from the graph, its compiled form written to the first cache
    folder that takes it (a staging folder renamed into place: never half-written)."""
    for root in _cache_roots(path.parent):
        try:
            root.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(dir=root, prefix=f".{spec.name}-"))
        except OSError:
            continue  # a read-only bundle: the user's cache folder is next
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(stage / _CONTEXT_FILE))
        so.add_session_config_entry("ep.context_embed_mode", "0")
        try:
            session = ort.InferenceSession(str(path), so)
            _keep(stage, root / f"{spec.name}-{key}", spec.name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return session
    return ort.InferenceSession(str(path), so)


def _keep(stage: Path, final: Path, name: str) -> None:
    if not (stage / _CONTEXT_FILE).is_file():
        return
    try:
        os.replace(stage, final)
        log.info("%s: compiled graph cached in %s", name, final)
    except OSError as exc:  # another process cached it first, or the disk is full
        log.info("%s: compiled graph not cached (%s)", name, exc)
