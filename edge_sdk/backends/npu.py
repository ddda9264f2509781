"""Sessions on plugin execution providers, and the NPU's compiled-graph cache.

An NPU compiles a graph for itself when a session is created (QNN: a "context binary";
seconds for our small UNet, minutes for SD 1.5's on the emulator). The compiled graph is
kept beside the bundle (`<bundle>/.npu-cache/`, or the user's cache folder when the bundle
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
from . import plugins

log = logging.getLogger(__name__)

CACHE_DIR = ".npu-cache"
_CONTEXT_FILE = "ctx.onnx"


def runs_on_npu(spec: ComponentSpec) -> bool:
    """Whether an NPU provider takes this component: statically quantized (QDQ) ONNX graphs;
    float and dynamically quantized ones run on the CPU beside it."""
    return spec.format == "onnx" and spec.precision in QDQ_PRECISIONS


def plugin_session(ort: Any, path: Path, spec: ComponentSpec, so: Any,
                   providers: list[str], given: Mapping[str, str]) -> Any:
    """An InferenceSession on the plugin EPs among `providers` (the CPU after them). On an
    NPU the CPU fallback is disabled: a graph it cannot run whole is an error, not a slow
    half-CPU run."""
    npu = False
    for name in providers:
        if plugins.plugin(name) is None:
            if name != "CPUExecutionProvider":
                log.warning("%s is not a plugin EP and cannot be combined with one; skipped",
                            name)
            continue
        so.add_provider_for_devices(plugins.devices(name), plugins.options(name, given))
        npu = npu or plugins.is_npu(name)
    if not npu:
        return ort.InferenceSession(str(path), so)
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    ep = next(p for p in providers if plugins.is_npu(p))
    key = _cache_key(spec, ep, plugins.options(ep, given))
    cached = _find_cached(path.parent, spec.name, key)
    try:
        if cached is not None:
            log.info("%s: loading the compiled %s graph from %s", spec.name, ep, cached)
            return ort.InferenceSession(str(cached), so)
        return _compile(ort, path, spec, so, key)
    except Exception as exc:  # ORT raises its own types
        raise BackendUnavailableError(
            f"{spec.name}: {ep} cannot run this graph whole with the CPU fallback disabled "
            f"({type(exc).__name__}: {str(exc).strip()[:300]}); see which operators fall "
            "back with `edge-sdk info BUNDLE --providers qnn`, or convert for the NPU with "
            "`edge-convert --precision w8a16 --sizes WxH`") from exc


def _cache_key(spec: ComponentSpec, ep: str, options: Mapping[str, str]) -> str:
    """What the compiled graph depends on: the graph's files, the EP and its options, the
    plugin's version."""
    import importlib.metadata as md
    mod = plugins.PLUGINS[ep].module.replace("_", "-")
    try:
        version = md.version(mod)
    except md.PackageNotFoundError:
        version = "?"
    blob = json.dumps({"files": [(f.path, f.size, f.sha256) for f in spec.files], "ep": ep,
                       "options": dict(sorted(options.items())), "version": version},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_roots(bundle: Path) -> list[Path]:
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-sdk" \
        / "npu" / hashlib.sha256(str(bundle.resolve()).encode()).hexdigest()[:16]
    return [bundle / CACHE_DIR, user]


def _find_cached(bundle: Path, name: str, key: str) -> Path | None:
    for root in _cache_roots(bundle):
        ctx = root / f"{name}-{key}" / _CONTEXT_FILE
        if ctx.is_file():
            return ctx
    return None


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
