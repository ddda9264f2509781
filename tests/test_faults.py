"""Faults: edge-convert killed at random moments, a full disk, cancelled generations, one
pipeline shared by threads. Nothing half-written may ever look like a bundle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_sdk import CancelledError, GenerationConfig, Manifest, Pipeline

from .conftest import needs_convert


def _convert_cmd(ckpt: Path, out: Path, *extra: str) -> list[str]:
    # the atomicity of writing is under test, not what is written: the smallest bundle
    return [sys.executable, "-m", "converters.cli", str(ckpt), "-o", str(out),
            "--no-vae-encoder", "--no-vae-stages", "--no-feature-cache", *extra]


def _state(bundle: Path) -> str:
    """'none', or the complete bundle's default step count; fails on anything partial."""
    if not bundle.exists():
        return "none"
    m = Manifest.load(bundle)          # a manifest that parses ...
    m.verify_files(bundle)             # ... and every file present with its sha256
    Pipeline.load(bundle)              # ... and loadable
    return str(m.defaults.steps)


@needs_convert
def test_killed_conversion_never_leaves_a_partial_bundle(models, tmp_path):
    ckpt = models.checkpoint("tiny-sd1")
    old = tmp_path / "bundle"
    t0 = time.perf_counter()
    subprocess.run(_convert_cmd(ckpt, old, "--default-steps", "7"), check=True,
                   capture_output=True)
    full = time.perf_counter() - t0
    rng = np.random.default_rng(1234)
    seen = set()
    # kill points spread over the whole run (imports, each component, the final rename),
    # with SIGKILL (no cleanup possible) and SIGTERM/SIGINT (the Python handlers run)
    for k, at in enumerate(sorted(rng.uniform(0.05, 1.1, 6) * full)):
        sig = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)[k % 3]
        fresh = tmp_path / f"fresh-{k}"
        procs = [subprocess.Popen(_convert_cmd(ckpt, old, "--overwrite"),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                 subprocess.Popen(_convert_cmd(ckpt, fresh), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)]
        time.sleep(at)
        for p in procs:
            p.send_signal(sig)
        for p in procs:
            p.wait(timeout=120)
        replaced = _state(old)       # the previous bundle (7 steps) or the new one, whole
        assert replaced in ("7", "25"), replaced
        assert _state(fresh) in ("none", "25")
        seen.add(replaced)
    assert "7" in seen, "no kill landed before the new bundle was complete: test too weak"
    # the next conversion sweeps what killed ones left behind
    subprocess.run(_convert_cmd(ckpt, old, "--overwrite"), check=True, capture_output=True)
    assert _state(old) == "25"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]


@needs_convert
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_is_a_clean_error_and_leaves_nothing(models, tmp_path):
    from converters.convert import convert
    from edge_sdk.errors import ConversionError
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(ConversionError, match="No space left on device.*free some disk space"):
            convert(models.checkpoint("tiny-sd1"), small / "bundle")
        assert list(small.iterdir()) == []  # no bundle, no staging folder
    finally:
        subprocess.run(["umount", str(small)], check=True)


@needs_convert
def test_output_path_under_a_file_is_a_clean_error(models, tmp_path):
    from converters.convert import convert
    from edge_sdk.errors import ConversionError
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConversionError, match="cannot write"):
        convert(models.checkpoint("tiny-sd1"), blocker / "bundle")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load()  # the shipped default model: needs only the runtime


def test_four_threads_share_one_pipeline_with_serial_results(pipe):
    cfg = lambda s: GenerationConfig(seed=s, steps=8)  # noqa: E731
    prompts = ["a red circle on a blue background", "two small green squares at the top",
               "a large yellow star on the left", "three purple triangles"]
    jobs = [(p, s) for p in prompts for s in range(5)]
    serial = {job: np.asarray(pipe(job[0], **cfg(job[1]).__dict__)) for job in jobs}
    threaded: dict = {}
    errors: list[BaseException] = []

    def worker(mine):
        try:
            for job in mine:
                threaded[job] = np.asarray(pipe(job[0], **cfg(job[1]).__dict__))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(threaded) == 20
    for job in jobs:
        assert np.array_equal(serial[job], threaded[job]), job


@pytest.mark.parametrize("how", ["returns False", "raises"])
def test_cancel_mid_generation_leaves_the_pipeline_usable(pipe, how):
    reference = np.asarray(pipe("a blue star", seed=3, steps=10))

    def stop(i, n, _latents):
        if i == 4:
            if how == "raises":
                raise KeyboardInterrupt  # e.g. Ctrl-C inside the app's callback
            return False
        return None

    with pytest.raises((CancelledError, KeyboardInterrupt)):
        pipe.generate("a blue star", GenerationConfig(seed=3, steps=10), callback=stop)
    assert np.array_equal(np.asarray(pipe("a blue star", seed=3, steps=10)), reference)
