"""The examples run as written (those that need no special hardware)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from edge_sdk.shapes.evaluator import analyse

from .conftest import SERVE_KEY, needs_convert, needs_serve

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_serve
def test_iot_client_gets_an_image_from_a_live_server(live_server, tmp_path):
    key = tmp_path / "key.txt"
    key.write_text(SERVE_KEY + "\n")
    out = tmp_path / "doorbell.png"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "iot_client.py"),
                           "a red circle on a blue background", "-o", str(out), "--server",
                           live_server.url, "--key-file", str(key), "--seed", "3",
                           "--steps", "12"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    image = Image.open(out)
    assert "Seed: 3" in image.info["parameters"] and "Steps: 12" in image.info["parameters"]
    seen = analyse(np.asarray(image.convert("RGB")))
    assert seen.colour == "red" and seen.background == "blue"
    assert "seed 3" in proc.stdout and not list(tmp_path.glob("*.tmp"))


@needs_convert
def test_convert_and_deploy_script_runs_as_written(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    import pytest
    if shutil.which("edge-convert") is None:
        pytest.fail("edge-convert is not on PATH: install the project (pip install -e '.[convert]')")
    env = {**os.environ, "WORK": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:"
           + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "convert_and_deploy.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out.png").is_file() and "PSNR" in proc.stdout


def test_npu_example_falls_back_to_cpu_and_names_the_fix_for_an_unusable_npu(
        tmp_path, monkeypatch, capsys):
    npu = _load("npu_select")
    assert npu.pick_providers(["CPUExecutionProvider"]) == []
    assert npu.pick_providers(["XnnpackExecutionProvider", "QNNExecutionProvider",
                               "CPUExecutionProvider"]) == ["qnn"]  # the NPU first
    out = tmp_path / "npu.png"
    monkeypatch.setattr("sys.argv", ["npu_select.py", "a red circle on a blue background",
                                     "-o", str(out)])
    assert npu.main() == 0
    seen = analyse(np.asarray(Image.open(out).convert("RGB")))
    assert seen.colour == "red" and seen.background == "blue"
    assert npu.pick_providers(["QNNExecutionProvider", "CPUExecutionProvider"],
                              npu_bundle=False) == []  # a float bundle: not the NPU
    # the NPU asked of the shipped (float) model: refused, naming the conversion it needs
    monkeypatch.setattr("sys.argv", ["npu_select.py", "x", "--require", "qnn"])
    assert npu.main() == 3
    assert "--precision w8a16 --sizes WxH" in capsys.readouterr().err
    # a TFLite delegate on the shipped (ONNX) model: refused, naming what applies instead
    monkeypatch.setattr("sys.argv", ["npu_select.py", "x", "--delegate", "/x/libnpu.so"])
    assert npu.main() == 3
    assert "--providers" in capsys.readouterr().err


def test_raspberry_pi_example_plans_low_memory_and_decodes_in_tiles(tmp_path, monkeypatch,
                                                                    capsys, caplog):
    import logging
    pi = _load("raspberry_pi")
    out = tmp_path / "pi.png"
    monkeypatch.setattr("sys.argv", ["raspberry_pi.py", "--size", "256", "--steps", "4",
                                     "-o", str(out)])
    with caplog.at_level(logging.WARNING):
        assert pi.main() == 0
    text = capsys.readouterr().out
    # the plan, printed once (in the report's table, not also by a log line and a print)
    assert text.count("memory mode 'low'") == 1 and "16-latent-pixel tiles" in text
    assert "peak private" in text
    assert "no VAE decoder stages" not in caplog.text  # the shipped bundle has them
    assert Image.open(out).size == (256, 256)
