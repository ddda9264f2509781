"""The examples run as written (those that need no special hardware)."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from edge_sdk import Pipeline
from edge_sdk.shapes.evaluator import analyse

from .conftest import needs_convert

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _call(url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# 22 malformed requests: (body, Content-Length header or None for the body's length)
MALFORMED = [(b, None) for b in (
    b"42", b"null", b'"abc"', b"[]", b"{", b"\xff\xfe", b'{"prompt": 5}', b'{"prompt": null}',
    b'{"prompt": "x", "steps": "many"}', b'{"prompt": "x", "steps": 1e9}',
    b'{"prompt": "x", "width": -64}', b'{"prompt": "x", "width": 100}',
    b'{"prompt": "x", "scheduler": 5}', b'{"prompt": "x", "scheduler": "nope"}',
    b'{"prompt": "x", "guidance_scale": "high"}', b'{"prompt": "x", "seed": true}',
    b'{"prompt": "' + b"x" * 20000 + b'"}', b'{"prompt": "x", "negative_prompt": 3}',
    b'{"prompt": "x", "negative_prompt": "' + b"x" * 20000 + b'"}',
    b'{"prompt": "x", "width": 8192, "height": 8192}')] + [  # the last: beyond any memory
    (b'{"prompt": "x"}', "abc"), (b'{"prompt": "x"}', str(10**6))]


def _raw(port: int, body: bytes, length: str | None) -> int:
    """POST /generate with exactly these bytes and Content-Length; the status code."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", length if length is not None else str(len(body)))
    conn.endheaders()
    conn.send(body if length is None or length.isdigit() and int(length) < 10**6 else b"")
    status = conn.getresponse().status
    conn.close()
    return status


def test_iot_service_generates_over_http(tmp_path):
    svc_mod = _load("iot_service")
    service = svc_mod.Service(Pipeline.load(), tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), svc_mod.make_handler(service))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _call(base + "/health")[1]["ok"] is True
        for body, length in MALFORMED:  # each refused before any work; the service goes on
            assert 400 <= _raw(server.server_address[1], body, length) < 500, body[:40]
        assert _call(base + "/health")[1]["ok"] is True
        code, body = _call(base + "/generate", {"prompt": "a red circle on a blue background",
                                                "seed": 3, "steps": 12})
        assert code == 202
        bad_code, bad = _call(base + "/generate", {"prompt": "x", "colour": "red"})
        assert bad_code == 400 and "colour" in bad["error"]
        bad_code, bad = _call(base + "/generate", {"prompt": "x", "steps": -1})
        assert bad_code == 400 and "steps" in bad["error"]  # refused before it is queued
        deadline = time.time() + 600  # a hang guard: emulated ARM is ~60x slower
        while (status := _call(f"{base}/jobs/{body['job']}")[1])["state"] != "done":
            assert status["state"] in ("queued", "running") and time.time() < deadline
            time.sleep(0.05)
        assert status["step"] == status["steps"] == 12
        seen = analyse(np.asarray(Image.open(status["path"]).convert("RGB")))
        assert seen.colour == "red" and seen.background == "blue"
        assert _call(base + "/jobs/999")[0] == 404
    finally:
        server.shutdown()
        service.stop()


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


def test_npu_example_falls_back_to_cpu_and_names_the_package_for_a_missing_npu(
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
    monkeypatch.setattr("sys.argv", ["npu_select.py", "x", "--require", "qnn"])
    assert npu.main() == 3
    assert "onnxruntime-qnn" in capsys.readouterr().err
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
