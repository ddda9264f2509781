"""Bad input gets a typed edge_sdk error with a message that names the problem."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest

from edge_sdk import (BundleError, InferenceError, IntegrityError, InvalidInputError,
                      ManifestError, Pipeline, SchedulerError)

from .conftest import needs_convert

pytestmark = needs_convert


@pytest.fixture(scope="module")
def pipe(models):
    return Pipeline.load(models.bundle("tiny-sd1"))


@pytest.fixture
def bundle_copy(models, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(models.bundle("tiny-sd1"), dst)
    return dst


def test_missing_bundle_folder(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Pipeline.load(tmp_path / "nope")


def test_folder_without_manifest(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        Pipeline.load(tmp_path)


def test_component_file_missing(bundle_copy):
    (bundle_copy / "unet.onnx.data").unlink()
    with pytest.raises(BundleError, match="unet.onnx.data.*missing"):
        Pipeline.load(bundle_copy)


def test_truncated_weights(bundle_copy):
    data = bundle_copy / "unet.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match="truncated"):
        Pipeline.load(bundle_copy)


def test_corrupted_weights_fail_checksum(bundle_copy):
    data = bundle_copy / "vae_decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        Pipeline.load(bundle_copy)


def test_corrupted_graph_without_checksums(bundle_copy):
    graph = bundle_copy / "text_encoder.onnx"
    graph.write_bytes(b"\x00" * graph.stat().st_size)  # same size, garbage
    with pytest.raises(BundleError, match="not a valid ONNX file|onnxruntime cannot load"):
        Pipeline.load(bundle_copy, verify=False)


def test_manifest_not_json(bundle_copy):
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="JSON"):
        Pipeline.load(bundle_copy)


def test_manifest_missing_field(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    del m["vae"]["scaling_factor"]
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="vae.scaling_factor"):
        Pipeline.load(bundle_copy)


def test_manifest_names_file_outside_bundle(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["components"]["unet"]["files"][0]["path"] = "../unet.onnx"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="inside the bundle"):
        Pipeline.load(bundle_copy)


def test_manifest_io_names_mismatch(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["components"]["unet"]["inputs"][0]["name"] = "latents"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="do not match the manifest"):
        Pipeline.load(bundle_copy)


def test_newer_format_version(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="upgrade edge-sdk"):
        Pipeline.load(bundle_copy)


@pytest.mark.parametrize("kwargs,match", [
    ({"width": 100}, "multiple of 8"),
    ({"height": 60}, "multiple of 8"),
    ({"width": 0}, "positive multiple"),
    ({"height": -64}, "positive multiple"),
    ({"width": 72}, "multiples of 16"),  # tiny UNet: 2 resolutions -> 16 px
    ({"width": 64.0}, "integer"),
    ({"steps": 0}, r"steps must be in \[1"),
    ({"steps": -3}, r"steps must be in \[1"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"guidance_scale": float("nan")}, "finite"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"num_images": 0}, "num_images"),
])
def test_bad_generation_arguments(pipe, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        pipe("a red circle", **kwargs)


def test_unknown_scheduler(pipe):
    with pytest.raises(SchedulerError, match="unknown scheduler 'warp'.*euler"):
        pipe("a red circle", scheduler="warp", steps=2)


def test_non_string_prompt(pipe):
    with pytest.raises(InvalidInputError, match="prompt must be a string"):
        pipe(None, steps=2)  # type: ignore[arg-type]


def test_bad_latents(pipe):
    with pytest.raises(InvalidInputError, match="latents must have shape"):
        pipe("x", steps=2, latents=np.zeros((1, 4, 5, 5), np.float32), width=64, height=64)
    bad = np.full((1, 4, 8, 8), np.nan, np.float32)
    with pytest.raises(InvalidInputError, match="finite"):
        pipe("x", steps=2, latents=bad)


def test_long_prompt_truncated_with_warning(pipe, caplog):
    long = "a red circle on a blue background " * 20  # ~140 tokens
    with caplog.at_level(logging.WARNING, logger="edge_sdk.tokenizer"):
        image = pipe(long, steps=2, seed=1)
    assert image.size == (64, 64)
    assert any("truncated" in r.getMessage() and "77 tokens" in r.getMessage()
               for r in caplog.records)


def test_nan_latents_from_model_are_reported(pipe):
    unet = pipe.session("unet")
    original = unet.run
    unet.run = lambda feeds: {"out_sample": np.full_like(feeds["sample"], np.nan)}
    try:
        with pytest.raises(InferenceError, match="NaN"):
            pipe("x", steps=2, seed=0)
    finally:
        unet.run = original
