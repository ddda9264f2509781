"""edge-convert and edge-sdk from the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from converters.cli import main as convert_main
from edge_sdk.cli import main as sdk_main

from .conftest import needs_convert

pytestmark = needs_convert


def test_convert_cli_progress_and_overwrite(models, tmp_path, capsys):
    ckpt, out = models.checkpoint("tiny-sd2"), tmp_path / "b"
    assert convert_main([str(ckpt), "-o", str(out), "--no-vae-encoder"]) == 0
    err = capsys.readouterr().err
    for comp in ("text_encoder", "unet", "vae_decoder"):
        assert f"{comp}: done in" in err
    assert not (out / "vae_encoder.onnx").exists()
    # an existing bundle is not replaced without --overwrite
    assert convert_main([str(ckpt), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["source"]["name"] == ckpt.name
    # an empty --name is refused before anything is written over the bundle
    assert convert_main([str(ckpt), "-o", str(out), "--overwrite", "--name", " "]) == 2
    assert "--name" in capsys.readouterr().err
    assert (out / "manifest.json").exists()
    assert convert_main([str(ckpt), "-o", str(out), "--overwrite", "--default-steps", "9",
                         "--name", " tiny-2 "]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["defaults"]["steps"] == 9 and manifest["source"]["name"] == "tiny-2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_convert_failure_leaves_nothing(models, tmp_path, capsys):
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(models.checkpoint("tiny-sd1"), ckpt)
    (ckpt / "vae" / "config.json").write_text("{broken")
    assert convert_main([str(ckpt), "-o", str(tmp_path / "b")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_generate_writes_png_with_parameters(models, tmp_path, capsys):
    out = tmp_path / "img.png"
    rc = sdk_main(["generate", "a red circle on a blue background", "--model",
                   str(models.bundle("tiny-sd1")), "-o", str(out), "--steps", "3", "--seed",
                   "42", "--width", "96", "--height", "64", "--scheduler", "euler_a",
                   "--negative-prompt", "blurry"])
    assert rc == 0
    image = Image.open(out)
    assert image.size == (96, 64)
    params = json.loads(image.text["parameters"])
    assert params["prompt"] == "a red circle on a blue background"
    assert (params["seed"], params["steps"], params["scheduler"]) == (42, 3, "euler_a")
    assert params["negative_prompt"] == "blurry"
    assert "3/3" in capsys.readouterr().err  # the progress bar reached the end


def test_generate_bad_input_is_one_line(models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "generate", "x", "--model",
                           str(models.bundle("tiny-sd1")), "--steps", "0", "-o",
                           str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: steps must be in [1")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_info(models, capsys):
    assert sdk_main(["info", str(models.bundle("tiny-sd2"))]) == 0
    out = capsys.readouterr().out
    assert "v_prediction" in out and "pad '!'" in out and "unet" in out
    assert sdk_main(["info", str(models.bundle("tiny-sd2")), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["variant"] == "sd2"


def test_num_images_are_written_as_numbered_files(models, tmp_path):
    out = tmp_path / "img.png"
    assert sdk_main(["generate", "x", "--model", str(models.bundle("tiny-sd1")), "-o", str(out),
                     "--steps", "2", "--num-images", "2", "-q"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img-0.png", "img-1.png"]


def test_sigterm_stops_a_generation_cleanly(tmp_path):
    """`docker stop` and service managers send SIGTERM: edge-sdk unwinds as for Ctrl-C (exit
    143, one line, no traceback, no image) instead of ignoring it as a container's PID 1."""
    import signal
    out = tmp_path / "out.png"
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "generate", "a red circle",
                             "--steps", "1000", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the first progress line: it is denoising now
    assert "denoising" in line, line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists()


def test_generate_from_an_image_and_a_mask(models, tmp_path, capsys):
    """--image/--mask/--strength: the PNG records the source's sha256 and the strength, the
    output takes the image's size rounded down to a multiple of 8; bench times the encoder."""
    import hashlib

    import numpy as np
    src, mask = tmp_path / "in.png", tmp_path / "mask.png"
    Image.fromarray((np.random.default_rng(1).random((70, 99, 3)) * 255).astype("uint8")
                    ).save(src)
    m = np.zeros((70, 99), "uint8")
    m[10:40, 20:60] = 255
    Image.fromarray(m).save(mask)
    bundle, out = models.bundle("tiny-sd1"), tmp_path / "out.png"
    assert sdk_main(["generate", "a red circle", "--model", str(bundle), "--image", str(src),
                     "--mask", str(mask), "--strength", "0.6", "--steps", "5", "--seed", "3",
                     "-o", str(out), "-q"]) == 0
    with Image.open(out) as img:
        assert img.size == (96, 64)
        params = json.loads(img.text["parameters"])
        assert img.text["image_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert params["strength"] == 0.6 and params["steps"] == 5
    assert params["mask_sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    capsys.readouterr()
    assert sdk_main(["bench", "x", "--model", str(bundle), "--image", str(src), "--steps", "5",
                     "--scheduler", "euler",
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vae_encoder_s"] > 0 and len(report["unet_step_s"]) == 4  # int(5 x 0.8)
    assert list(report["stage_peak_private_bytes"]) == ["prepare", "text_encoder",
                                                        "vae_encoder", "denoise", "vae_decoder"]
