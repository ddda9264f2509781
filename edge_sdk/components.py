"""The loaded components of a bundle: each session opened on first use and released (or its
mapped weights dropped) after its stage, as the memory plan says."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backends import BackendOptions, Session, check_backend, open_session, plugins, provider_name
from .backends.npu import runs_on_npu
from .contracts import COMPUTE_BOUND_KINDS
from .errors import BundleError, InvalidInputError
from .manifest import Manifest
from .memory import MemoryPlan
from .osmem import drop_mapped_pages

log = logging.getLogger(__name__)

Wrapper = Callable[[Session], Session]


class Components:
    """Sessions by role. `session(role)` opens one when first needed; `done_with(role)` is
    called after each stage, and releases the session (low memory) or takes its mapped
    weights out of the resident set (balanced), or keeps it (fast)."""

    def __init__(self, bundle: Path, manifest: Manifest, options: BackendOptions,
                 plan: MemoryPlan) -> None:
        self.bundle, self.manifest, self.options, self.plan = bundle, manifest, options, plan
        self._sessions: dict[str, Session] = {}
        self._wrappers: dict[str, Wrapper] = {}
        # weights that replace the graph's (a load-time LoRA's), by role
        self._weights: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    def replan(self, options: BackendOptions, plan: MemoryPlan) -> "Components":
        """The same bundle under another plan: no session open, the wrappers and weights
        kept."""
        other = Components(self.bundle, self.manifest, options, plan)
        other._wrappers, other._weights = dict(self._wrappers), dict(self._weights)
        return other

    def set_weights(self, role: str, weights: dict[str, np.ndarray]) -> None:
        """Run the role's graph with `weights` (initializer name -> values) in place of its
        own from now on; an open session of it is closed, to be opened anew when needed.
        Empty: its own weights again."""
        with self._lock:
            old = self._weights.get(role, {})
            if old.keys() == weights.keys() and all(np.array_equal(old[k], weights[k])
                                                    for k in weights):
                return  # the same weights: the open session stays
            self._weights.pop(role, None)
            if weights:
                self._weights[role] = weights
            self._sessions.pop(role, None)

    @property
    def loaded(self) -> list[str]:
        """The roles whose sessions are open now."""
        return list(self._sessions)

    def session(self, role: str) -> Session:
        """The open session of a component (opened on first use)."""
        with self._lock:
            if role not in self._sessions:
                spec = self.manifest.components.get(role)
                if spec is None:
                    raise BundleError(f"this bundle has no {role!r} component; re-convert it "
                                      "with that component")
                session = open_session(self.bundle, spec, self.options,
                                       self._weights.get(role))
                wrap = self._wrappers.get(role)
                self._sessions[role] = wrap(session) if wrap else session
            return self._sessions[role]

    def wrap(self, role: str, wrapper: Wrapper) -> None:
        """Pass the role's session through `wrapper` from now on (it sees what the stage
        feeds: calibration records the UNet's inputs this way)."""
        with self._lock:
            self._wrappers[role] = wrapper
            if role in self._sessions:
                self._sessions[role] = wrapper(self._sessions[role])

    def done_with(self, role: str) -> None:
        """A stage is over: release its session or drop its mapped pages, per the plan (a
        compute-bound kind's session, with its arena, is released in any plan that maps
        weights)."""
        spec = self.manifest.components.get(role)
        if self.plan.release_between_stages or (
                self.plan.map_weights and spec is not None and spec.kind in COMPUTE_BOUND_KINDS):
            with self._lock:
                self._sessions.pop(role, None)
        elif self.plan.drop_pages and spec is not None:
            dropped = drop_mapped_pages(self.bundle / f.path for f in spec.files)
            log.debug("%s: %.1f MiB of mapped weights dropped", role, dropped / 2**20)

    def open_all(self, roles: tuple[str, ...]) -> None:
        """Open `roles` now, so a broken graph is an error at load rather than mid-run. A
        plan that releases components between stages opens none (each is opened when its
        stage comes: opening them here would load every one twice); the backend options
        are still checked against each, and the files were checked by the manifest."""
        if self.plan.release_between_stages:
            for role in roles:
                check_backend(self.manifest.components[role], self.options)
            return
        for role in roles:
            self.session(role)
            self.done_with(role)


def check_accelerator_options(manifest: Manifest, providers: Sequence[str] | None,
                               delegate: str | None) -> None:
    """An accelerator option that cannot apply to this bundle is an error, not ignored: the
    caller expects the NPU to run."""
    formats = {c.format for c in manifest.components.values()}
    if delegate and "tflite" not in formats:
        raise InvalidInputError("a TFLite delegate was given but this bundle holds no TFLite "
                                "component; use ONNX Runtime execution providers (providers= "
                                "/ --providers) or convert with `edge-convert --format tflite`")
    if providers and "onnx" not in formats:
        raise InvalidInputError("ONNX Runtime execution providers were given but this bundle "
                                "is TFLite; use a delegate (delegate= / --delegate PATH.so)")
    npu = [p for p in providers or () if plugins.is_npu(provider_name(p))]
    if npu and not any(runs_on_npu(c) for c in manifest.components.values()):
        raise InvalidInputError(f"execution provider {npu[0]!r} is an NPU, which runs "
                                "statically quantized graphs, and this bundle has none; "
                                "convert one with `edge-convert CHECKPOINT -o BUNDLE "
                                "--precision w8a16 --sizes WxH` (or w8a8)")
