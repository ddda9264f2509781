"""A model file cannot make the runtime read files outside its bundle."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from edge_sdk import BundleError, Pipeline

from .conftest import needs_convert

pytestmark = needs_convert


def _retarget(bundle, component: str, location: str) -> None:
    """Rewrite every external-data location of a component's graph, and the manifest's size
    and sha256 of the graph to match (an attacker controls the whole folder)."""
    import onnx

    from edge_sdk.manifest import sha256_file
    path = bundle / f"{component}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
    m = json.loads((bundle / "manifest.json").read_text())
    entry = m["components"][component]["files"][0]
    entry["size"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (bundle / "manifest.json").write_text(json.dumps(m))


@pytest.fixture
def bundle_copy(models, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(models.bundle("tiny-sd1"), dst)
    return dst


def test_external_data_with_dotdot_is_refused(bundle_copy):
    _retarget(bundle_copy, "unet", "../../etc/passwd")
    with pytest.raises(BundleError, match="points outside the bundle"):
        Pipeline.load(bundle_copy)


def test_external_data_absolute_path_is_refused(bundle_copy):
    _retarget(bundle_copy, "text_encoder", "/etc/passwd")
    with pytest.raises(BundleError, match="points outside the bundle"):
        Pipeline.load(bundle_copy, verify=False)


def test_external_data_symlink_out_is_refused(bundle_copy):
    os.symlink("/etc/passwd", bundle_copy / "evil.data")
    _retarget(bundle_copy, "vae_decoder", "evil.data")
    # even when the manifest lists the link as the component's file
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["components"]["vae_decoder"]["files"][1]["path"] = "evil.data"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="symbolic link"):
        Pipeline.load(bundle_copy, verify=False)
    # and when the manifest does not list it, the graph check refuses it
    shutil.copytree(bundle_copy, bundle_copy.parent / "b2", symlinks=True)
    m["components"]["vae_decoder"]["files"][1]["path"] = "vae_decoder.onnx.data"
    (bundle_copy.parent / "b2" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="points outside the bundle"):
        Pipeline.load(bundle_copy.parent / "b2", verify=False)


def test_external_data_not_in_manifest_is_refused(bundle_copy):
    shutil.copy(bundle_copy / "unet.onnx.data", bundle_copy / "other.data")
    _retarget(bundle_copy, "unet", "other.data")
    with pytest.raises(BundleError, match="does not list"):
        Pipeline.load(bundle_copy, verify=False)
