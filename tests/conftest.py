"""Shared fixtures: tiny SD-architecture checkpoints built offline from fixed seeds, and their
converted bundles (built once per test session)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("converters").setLevel(logging.WARNING)


def _have(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


HAVE_CONVERT = _have("torch") and _have("diffusers") and _have("onnx") and _have("accelerate")
needs_convert = pytest.mark.skipif(not HAVE_CONVERT, reason="needs the [convert] extra")
HAVE_TFLITE_CONVERT = HAVE_CONVERT and _have("litert_torch") and _have("ai_edge_quantizer")
# `edge-sdk serve` and the real clients it is tested with (the [serve] and [test] extras)
HAVE_SERVE = all(_have(m) for m in ("starlette", "uvicorn", "python_multipart", "openai", "webuiapi"))
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="needs the [serve] extra and the "
                                 "openai and webuiapi clients")


class Models:
    """Lazily built checkpoints and bundles, cached for the whole session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.exports = root / "tflite-exports"
        self._cache: dict[tuple[str, ...], Path] = {}

    def checkpoint(self, arch: str) -> Path:
        """A tiny architecture built from a fixed seed, or "shapes": the shipped model's."""
        if arch == "shapes":
            return Path(__file__).resolve().parents[1] / "models" / "shapes" / "checkpoint"
        key = ("ckpt", arch)
        if key not in self._cache:
            from converters.synth import build_checkpoint
            self._cache[key] = build_checkpoint(self.root / f"ckpt-{arch}", arch, seed=0)
        return self._cache[key]

    def controlnet(self, arch: str = "tiny-sd1", seed: int = 1) -> Path:
        """A ControlNet for the tiny checkpoint `arch` (converters.synth.build_controlnet:
        random weights, its zero convolutions too)."""
        key = ("controlnet", arch, str(seed))
        if key not in self._cache:
            from converters.synth import build_controlnet
            self._cache[key] = build_controlnet(self.root / f"controlnet-{arch}-{seed}",
                                                self.checkpoint(arch), seed, (8, 8, 16, 16))
        return self._cache[key]

    def control_bundle(self, nets: int = 2, precision: str = "fp32") -> Path:
        """tiny-sd1 converted with `nets` ControlNets (seeds 1, 2 ...)."""
        key = ("control-bundle", str(nets), precision)
        if key not in self._cache:
            from converters.convert import convert
            out = self.root / f"bundle-tiny-sd1-{nets}cn-{precision}"
            convert(self.checkpoint("tiny-sd1"), out, precision=precision,
                    controlnets=tuple(self.controlnet("tiny-sd1", s) for s in
                                      range(1, nets + 1)))
            self._cache[key] = out
        return self._cache[key]

    def bundle(self, arch: str, precision: str = "fp32", fmt: str = "onnx",
               **options: object) -> Path:
        """The checkpoint converted with edge-convert (options: convert()'s keywords)."""
        extra = tuple(sorted((k, str(v)) for k, v in options.items()))
        key = ("bundle", arch, precision, fmt, *(f"{k}={v}" for k, v in extra))
        if key not in self._cache:
            from converters.convert import convert
            out = self.root / "-".join(["bundle", arch, precision, fmt,
                                        *(f"{k}{Path(v).name if k == 'calibration' else v}"
                                          .replace(",", "_") for k, v in extra)])
            # TFLite: the tiny models' fp32 exports are shared across this session's
            # conversions (edge-convert --export-cache): another precision costs only its
            # quantization. The shapes model's (converted once) take the default path.
            cache = {"export_cache": self.exports} if fmt == "tflite" and arch != "shapes" \
                else {}
            convert(self.checkpoint(arch), out, precision=precision, fmt=fmt, **cache,
                    **options)
            self._cache[key] = out
        return self._cache[key]


# EDGE_SDK_RUNTIME_ONLY=1 (the emulated-ARM stage, where only the runtime is installed):
# tests that need the converter are deselected, not skipped, and any skip left is a failure,
# so the stage cannot pass by skipping.
RUNTIME_ONLY = os.environ.get("EDGE_SDK_RUNTIME_ONLY") == "1"


def _needs_convert(item: pytest.Item) -> bool:
    """Needs what the runtime-only stage does not install: the converter, or the server's
    extra and its clients."""
    extras = (needs_convert.kwargs["reason"], needs_serve.kwargs["reason"])
    return "models" in getattr(item, "fixturenames", ()) or any(
        m.kwargs.get("reason") in extras for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not RUNTIME_ONLY:
        return
    dropped = [i for i in items if _needs_convert(i)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [i for i in items if not _needs_convert(i)]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if RUNTIME_ONLY and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped in the runtime-only stage: {report.longrepr}"


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    if not HAVE_CONVERT:
        pytest.skip("needs the [convert] extra (torch, diffusers, onnx)")
    return Models(tmp_path_factory.mktemp("models"))


SERVE_KEY = "test-key-0123456789"
SERVE_USER, SERVE_PASSWORD = "alice", "secret-pass"


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory):
    """One `edge-sdk serve` for the session, on the shipped models: an API key and an
    --api-auth pair, a queue of one (so a third request finds it full), a 1 MiB body limit."""
    if not HAVE_SERVE:
        pytest.skip(needs_serve.kwargs["reason"])
    from tests.serve_helpers import LiveServer
    server = LiveServer(["--api-key", SERVE_KEY, "--api-auth", f"{SERVE_USER}:{SERVE_PASSWORD}",
                         "--max-queue", "1", "--max-body-mb", "1"],
                        tmp_path_factory.mktemp("serve") / "server.log")
    yield server
    server.stop()
