"""NPU readiness: how many of a graph's nodes a plugin EP takes, and which op types fall back.

onnxruntime has no API for a session's node placement; it logs it at the verbose level: the
EP's verdict on every node (QNN: "Validation PASSED/FAILED for N nodes in OrtNodeUnit (Op)",
each node named, with the reason of a refusal) and the nodes left to the CPU
("Node(s) placed on [CPUExecutionProvider]"). This module creates a session on the EP with
the CPU fallback allowed and that log captured, and reads both.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from . import plugins

_UNIT = re.compile(r"Validation (PASSED|FAILED) for \d+ nodes in OrtNodeUnit")
_NODE = re.compile(r"Operator type: (\S+) Node name: (.*?) Node index: \d+")
_REASON = re.compile(r"REASON : (.*)")
_ASSIGNED = re.compile(r"VerifyEachNodeIsAssignedToAnEp\]\s+(.*)$")
_PLACED = re.compile(r"Node\(s\) placed on \[(\w+)\]")
_LISTED = re.compile(r"(\S+) \((.*)\)\s*$")


@dataclass
class Placement:
    """One graph's nodes on an EP: what it took, what fell back to the CPU and why."""

    component: str
    ep: str
    nodes: int = 0  # the graph's nodes as the EP saw them (after onnxruntime's folding)
    cpu_ops: Counter = field(default_factory=Counter)  # op type -> nodes left to the CPU
    reasons: list[str] = field(default_factory=list)  # the EP's distinct refusals
    error: str | None = None  # the session could not be created at all

    @property
    def on_cpu(self) -> int:
        return sum(self.cpu_ops.values())

    @property
    def on_ep(self) -> int:
        return self.nodes - self.on_cpu

    def describe(self) -> str:
        if self.error:
            return f"{self.component}: {self.ep} failed: {self.error}"
        share = 100 * self.on_ep / self.nodes if self.nodes else 0.0
        line = (f"{self.component}: {self.on_ep} of {self.nodes} nodes on {self.ep} "
                f"({share:.1f} %), {self.on_cpu} on the CPU")
        if self.cpu_ops:
            line += " (" + ", ".join(f"{op} x{n}" for op, n in self.cpu_ops.most_common()) + ")"
        return line


def placement(path: Path, component: str, ep: str,
              given: Mapping[str, str] | None = None) -> Placement:
    """Where the plugin EP `ep` places the nodes of the graph at `path` (a session is
    created, compiling the graph for the NPU: seconds for the shipped model's UNet)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 0  # verbose: the placement is only logged there
    # the graph as the bundle holds it: no CPU-specific rewrites in the counts
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.add_provider_for_devices(plugins.devices(ep), plugins.options(ep, given or {}))
    report = Placement(component, ep)
    try:
        text = _stderr_of(lambda: ort.InferenceSession(str(path), so))
    except _Failed as failed:
        report.error = failed.message[:300]
        text = failed.text
    _read(text, report)
    return report


class _Failed(Exception):
    def __init__(self, message: str, text: str) -> None:
        super().__init__(message)
        self.message, self.text = message, text


_capture = threading.Lock()


def _stderr_of(fn: Any) -> str:
    """What `fn` writes to file descriptor 2 (onnxruntime's logger writes there, below
    Python's sys.stderr), captured in a temporary file. The descriptor is the process's:
    one capture at a time, and what other threads write meanwhile is captured too (a
    report tool's cost, not a serving path's)."""
    with _capture:
        return _captured(fn)


def _captured(fn: Any) -> str:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        error = None
        try:
            fn()
        except Exception as exc:  # ORT's own types; reported with the log read so far
            error = f"{type(exc).__name__}: {str(exc).strip()}"
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode("utf-8", "replace")
    if error is not None:
        raise _Failed(error, text)
    return text


def _read(text: str, report: Placement) -> None:
    """The EP's verdicts (the last for each node: the EP is asked more than once) and the
    CPU's placement list."""
    verdict: dict[str, bool] = {}
    reasons: list[str] = []
    cpu: Counter = Counter()
    passed, listing = None, False
    for line in text.splitlines():
        if (m := _UNIT.search(line)) is not None:
            passed, listing = m.group(1) == "PASSED", False
        elif (m := _NODE.search(line)) is not None and passed is not None:
            verdict[m.group(2)] = passed
        elif (m := _REASON.search(line)) is not None:
            reason = re.sub(r"`[^`]*`", "`…`", m.group(1).strip())
            if reason not in reasons:
                reasons.append(reason)
        elif (m := _ASSIGNED.search(line)) is not None:
            body, passed = m.group(1), None
            if (p := _PLACED.search(body)) is not None:
                listing = p.group(1) == "CPUExecutionProvider"
            elif listing and (q := _LISTED.match(body)) is not None:
                cpu[q.group(1)] += 1
    report.nodes = max(len(verdict), cpu.total())
    report.cpu_ops = cpu
    report.reasons = reasons[:8]


def check_provider(provider: str) -> str:
    """The full name of a provider the report can read (QNN), or an InvalidInputError."""
    from ..errors import InvalidInputError
    from . import provider_name
    ep = provider_name(provider)
    if ep != plugins.QNN:
        raise InvalidInputError(f"the readiness report reads the QNN EP's verdict on each "
                                f"node, which {provider!r} does not log; use --providers qnn")
    return ep


def bundle_readiness(bundle: Path, manifest: Any, provider: str,
                     given: Mapping[str, str] | None = None) -> list[str]:
    """The readiness report of a bundle on a plugin EP, one line a main component: where the
    EP places the nodes of those it runs; the others are said to run on the CPU."""
    from .npu import runs_on_npu
    ep = check_provider(provider)
    lines = []
    for spec in manifest.components.values():
        if spec.kind not in ("text_encoder", "unet", "vae_decoder"):
            continue  # helpers (stages, the encoder) run where their stage runs
        if plugins.is_npu(ep) and not runs_on_npu(spec):
            lines.append(f"{spec.name}: {spec.format} {spec.precision}, runs on the CPU (the "
                         "NPU takes w8a8/w8a16 graphs)")
        elif spec.format != "onnx":
            lines.append(f"{spec.name}: {spec.format}, not an ONNX graph")
        else:
            lines.append(placement(bundle / spec.path, spec.name, ep, given).describe())
    return lines
