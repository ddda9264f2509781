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


HAVE_CONVERT = _have("torch") and _have("diffusers") and _have("onnx")
needs_convert = pytest.mark.skipif(not HAVE_CONVERT, reason="needs the [convert] extra")


class Models:
    """Lazily built checkpoints and bundles, cached for the whole session."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[tuple[str, ...], Path] = {}

    def checkpoint(self, arch: str) -> Path:
        key = ("ckpt", arch)
        if key not in self._cache:
            from converters.synth import build_checkpoint
            self._cache[key] = build_checkpoint(self.root / f"ckpt-{arch}", arch, seed=0)
        return self._cache[key]

    def bundle(self, arch: str, precision: str = "fp32") -> Path:
        key = ("bundle", arch, precision)
        if key not in self._cache:
            from converters.convert import convert
            out = self.root / f"bundle-{arch}-{precision}"
            convert(self.checkpoint(arch), out, precision=precision)
            self._cache[key] = out
        return self._cache[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    if not HAVE_CONVERT:
        pytest.skip("needs the [convert] extra (torch, diffusers, onnx)")
    return Models(tmp_path_factory.mktemp("models"))
