"""TFLite bundles (edge-convert --format tflite) on the LiteRT backend: the same images as the
ONNX bundles, static shapes served by signature, mapped weights, typed errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk import Pipeline
from edge_sdk.errors import BackendUnavailableError, BundleError, InvalidInputError

from .conftest import HAVE_TFLITE_CONVERT

needs_tflite = pytest.mark.skipif(not HAVE_TFLITE_CONVERT,
                                  reason="needs the [tflite-convert] extra")


# one conversion of the shapes model per format, shared by every test here (and one ONNX
# test elsewhere): a TFLite conversion costs about a minute
SHAPES = dict(vae_encoder=False, default_steps=20, default_guidance=2.0)
# the tiny model with static sizes and ONNX decoder stages: both tests of those share it
# 104x72: a multiple of 8 that the tiny UNet's 16-px downsampling does not divide
STATIC_STAGED = dict(sizes="64x64,104x72", vae_stages=True, vae_encoder=False)


def _images(pipe: Pipeline, latents: np.ndarray, **kw: object) -> np.ndarray:
    return np.asarray(pipe("a red circle on a blue background", latents=latents, **kw)
                      ).astype(int)


@needs_tflite
@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sd2"])
def test_tflite_fp32_bundle_matches_the_onnx_one(models, arch):
    tfl = Pipeline.load(models.bundle(arch, fmt="tflite"))
    onnx = Pipeline.load(models.bundle(arch))
    assert {c.format for c in tfl.manifest.components.values()} == {"tflite"}
    side = tfl.manifest.unet.sample_size
    lat = np.random.default_rng(3).standard_normal((1, 4, side, side)).astype(np.float32)
    for guidance in (1.0, 5.0):  # batch 1, and batch 2 run image by image
        diff = np.abs(_images(tfl, lat, steps=3, guidance_scale=guidance)
                      - _images(onnx, lat, steps=3, guidance_scale=guidance))
        assert diff.max() <= 2, (arch, guidance, diff.max())
    enc_t, enc_o = tfl.session("vae_encoder"), onnx.session("vae_encoder")
    img = np.random.default_rng(4).uniform(-1, 1, (1, 3, 8 * side, 8 * side)).astype(np.float32)
    np.testing.assert_allclose(enc_t.run({"image": img})["latent_mean"],
                               enc_o.run({"image": img})["latent_mean"], atol=1e-3)


@needs_tflite
def test_the_default_model_as_tflite_gives_the_onnx_image(models):
    tfl = Pipeline.load(models.bundle("shapes", fmt="tflite", **SHAPES))
    onnx = Pipeline.load(models.bundle("shapes", **SHAPES))
    rng = np.random.default_rng(0)
    for prompt in ("a red circle on a blue background", "two small green squares at the top"):
        lat = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
        # the seed too: the shipped sampler (Euler ancestral) draws fresh noise every step
        a = np.asarray(tfl(prompt, latents=lat, seed=7)).astype(int)
        b = np.asarray(onnx(prompt, latents=lat, seed=7)).astype(int)
        assert np.abs(a - b).max() <= 2


@needs_tflite
def test_several_sizes_one_file_and_a_clear_error_for_others(models):
    bundle = models.bundle("tiny-sd1", fmt="tflite", **STATIC_STAGED)
    tfl, onnx = Pipeline.load(bundle), Pipeline.load(models.bundle("tiny-sd1"))
    assert [f.path for f in tfl.manifest.components["unet"].files] == ["unet.tflite"]
    assert tfl.manifest.static_sizes == ((64, 64), (72, 104))
    from edge_sdk.cli import describe
    text = "\n".join(describe(tfl.manifest, bundle))
    assert "static sizes 64x64, 104x72" in text and re.search(r"\n  unet +tflite ", text)
    lat = np.random.default_rng(5).standard_normal((2, 4, 9, 13)).astype(np.float32)
    a = np.asarray(tfl.generate("a cat", _cfg(width=104, height=72, num_images=2),
                                latents=lat).images[1]).astype(int)
    b = np.asarray(onnx.generate("a cat", _cfg(width=104, height=72, num_images=2),
                                 latents=lat).images[1]).astype(int)
    assert np.abs(a - b).max() <= 2
    with pytest.raises(InvalidInputError, match="96x96.*static shapes.*--sizes"):
        tfl("a cat", width=96, height=96)
    with pytest.raises(InvalidInputError, match="static shapes"):  # below the pipeline too
        tfl.session("unet").run({"sample": np.zeros((1, 4, 16, 16), np.float32),
                                 "timestep": np.zeros(1, np.float32),
                                 "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)})


def _cfg(**kw: object):
    from edge_sdk import GenerationConfig
    return GenerationConfig(steps=2, guidance_scale=4.0, seed=0, **kw)


@needs_tflite
def test_int8_fp16_int4_bundles_are_smaller_and_close(models):
    ref = Pipeline.load(models.bundle("tiny-sd1", fmt="tflite"))
    ref_size = ref.manifest.components["unet"].files[0].size
    lat = np.random.default_rng(6).standard_normal((1, 4, 8, 8)).astype(np.float32)
    want = _images(ref, lat, steps=3)
    sizes = {}
    for precision in ("fp16", "int8", "int4"):
        pipe = Pipeline.load(models.bundle("tiny-sd1", precision, fmt="tflite",
                                           vae_encoder=False))
        unet = pipe.manifest.components["unet"]
        assert unet.precision == precision
        sizes[precision] = unet.files[0].size
        got = _images(pipe, lat, steps=3)
        mse = np.mean((got - want) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-9)) > 25, precision
    # a tiny UNet keeps a larger share of small fp32 tensors (norms, biases) than SD does
    assert sizes["fp16"] < 0.6 * ref_size and sizes["int8"] < 0.45 * ref_size
    assert sizes["int4"] < sizes["int8"], sizes


@needs_tflite
def test_mixed_bundle_decodes_in_tiles_with_onnx_stages(models):
    """--format tflite --vae-stages: the decoder's stages are ONNX (any size, exact tiles)."""
    bundle = models.bundle("tiny-sd1", fmt="tflite", **STATIC_STAGED)
    formats = {c.name: c.format for c in Pipeline.load(bundle).manifest.components.values()}
    assert formats["unet"] == "tflite" and formats["vae_decoder_s00"] == "onnx"
    lat = np.random.default_rng(7).standard_normal((1, 4, 8, 8)).astype(np.float32)
    whole = _images(Pipeline.load(bundle), lat, steps=2)
    tiled = _images(Pipeline.load(bundle, memory="low"), lat, steps=2)
    assert np.abs(whole - tiled).max() <= 2
    with pytest.raises(BundleError, match="stored as 'tflite'.*backend 'onnx'"):
        Pipeline.load(bundle, backend="onnx")


@needs_tflite
def test_interpreter_and_compiled_model_agree(models):
    """The external-delegate route (classic Interpreter) computes what CompiledModel does."""
    from ai_edge_litert import interpreter

    from edge_sdk.backends import BackendOptions
    from edge_sdk.backends.litert import _Interpreted
    pipe = Pipeline.load(models.bundle("tiny-sd1", fmt="tflite"))
    session = pipe.session("unet")
    feeds = {"sample": np.ones((1, 4, 8, 8), np.float32),
             "timestep": np.array([500.0], np.float32),
             "encoder_hidden_states": np.full((1, 77, 32), 0.1, np.float32)}
    key = next(iter(session._engine.signatures))
    alt = _Interpreted(interpreter, pipe.bundle / "unet.tflite", BackendOptions())
    np.testing.assert_allclose(alt.run(key, feeds)["out_sample"],
                               session.run(feeds)["out_sample"], atol=1e-4)


@needs_tflite
def test_missing_delegate_backend_and_runtime_are_typed_errors(models, monkeypatch):
    from edge_sdk.backends import litert
    bundle = models.bundle("tiny-sd1", fmt="tflite")
    with pytest.raises(BackendUnavailableError, match="delegate library .*does not exist"):
        Pipeline.load(bundle, delegate="/nonexistent/libvendor_delegate.so")
    import _ctypes
    with pytest.raises(BackendUnavailableError, match="not a TFLite external delegate"):
        Pipeline.load(bundle, delegate=_ctypes.__file__)  # a shared library, not a delegate
    not_so = Path(bundle) / "manifest.json"
    cli = subprocess.run([sys.executable, "-m", "edge_sdk.cli", "generate", "x", "--model",
                          str(bundle), "--delegate", str(not_so), "-o", "/tmp/never.png"],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and "failed to load" in cli.stderr
    assert "Traceback" not in cli.stderr and "Exception ignored" not in cli.stderr
    with pytest.raises(InvalidInputError, match="bundle is TFLite; use a delegate"):
        Pipeline.load(bundle, providers=["xnnpack"])
    with pytest.raises(BundleError, match="stored as 'tflite'.*--format onnx"):
        Pipeline.load(bundle, backend="onnx")
    with pytest.raises(InvalidInputError, match="unknown"):
        Pipeline.load(bundle, backend="tensorrt")
    # neither LiteRT nor tflite-runtime importable
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setattr(litert._import_util, "find_spec", lambda name: None)
    with pytest.raises(BackendUnavailableError, match="pip install ai-edge-litert"):
        Pipeline.load(bundle)
    # only tflite-runtime, with numpy 2: said before it fails deep inside
    monkeypatch.setattr(litert._import_util, "find_spec", lambda name: object())
    monkeypatch.setattr(litert.np, "__version__", "2.1.0")
    with pytest.raises(BackendUnavailableError, match="numpy < 2"):
        Pipeline.load(bundle)


MAPPED_LOAD = """
import json, sys
import numpy as np
from pathlib import Path
from edge_sdk.backends import BackendOptions
from edge_sdk.backends.litert import LiteRTSession
from edge_sdk.bench import process_memory
from edge_sdk.manifest import Manifest
bundle = Path(sys.argv[1])
m = Manifest.load(bundle)
# LiteRT's own set-up (environment, accelerators) first, so that only the UNet is measured
te = LiteRTSession(bundle / m.components["text_encoder"].path, m.components["text_encoder"],
                   BackendOptions(threads=1))
te.run({"input_ids": np.zeros((1, m.tokenizer.max_length), np.int64)})
before = process_memory()["RssAnon"]
unet = LiteRTSession(bundle / m.components["unet"].path, m.components["unet"],
                     BackendOptions(threads=1))
print(json.dumps({"private": process_memory()["RssAnon"] - before}))
"""


@needs_tflite
def test_a_loaded_tflite_unet_stays_mapped(models, tmp_path):
    """XNNPACK packs the weights for its kernels; with the weight cache the packed copy is a
    file, mapped, instead of private memory (the default model: +6 MiB private against +31
    MiB without a cache, for a 26 MiB UNet)."""
    import os
    bundle = models.bundle("shapes", fmt="tflite", **SHAPES)
    size = Pipeline.load(bundle).manifest.components["unet"].files[0].size

    def private_after_load(cache_dir: str) -> int:
        env = {**os.environ, "EDGE_SDK_CACHE_DIR": cache_dir}
        out = subprocess.run([sys.executable, "-c", MAPPED_LOAD, str(bundle)],
                             capture_output=True, text=True, check=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])["private"]

    private_after_load(str(tmp_path))  # writes the cache
    cached = private_after_load(str(tmp_path))
    uncached = private_after_load("/proc/no-cache-here")  # not writable: no cache
    assert list((tmp_path / "xnnpack").glob("*.xnn")), "no weight cache written"
    assert not list((tmp_path / "xnnpack").glob("*.tmp"))
    assert uncached - cached > 0.7 * size, (cached, uncached, size)


@needs_tflite
def test_tflite_generation_with_torch_blocked(models, tmp_path):
    """The LiteRT backend keeps the runtime's boundary: no torch, diffusers, transformers or
    converters imported for a whole generation."""
    from .test_torch_free import BLOCKED_RUN, ROOT
    script = tmp_path / "run.py"
    script.write_text(BLOCKED_RUN)
    proc = subprocess.run([sys.executable, str(script),
                           str(models.bundle("tiny-sd1", fmt="tflite"))],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["size"] == [64, 64] and out["std"] > 1.0 and out["loaded"] == []


@needs_tflite
def test_export_cache_reuses_identical_exports_and_only_those(models, tmp_path, monkeypatch):
    """--export-cache: a second conversion of the same weights traces nothing and writes the
    same files; other weights or sizes get a new key; a failed trace leaves no entry."""
    import torch

    from converters import export_tflite
    from converters.convert import convert
    from converters.export_cache import cached_export, export_key, open_cache
    first = models.bundle("tiny-sd1", fmt="tflite")  # fp32, its exports in models.exports
    assert {p.name.split("-")[0] for p in models.exports.glob("*.tflite")} >= {
        "text_encoder", "unet", "vae_decoder", "vae_encoder"}

    def no_trace(*a: object) -> None:
        raise AssertionError("traced although the export was in the cache")
    monkeypatch.setattr(export_tflite, "_trace", no_trace)
    again = convert(models.checkpoint("tiny-sd1"), tmp_path / "again", fmt="tflite",
                    export_cache=models.exports)
    assert again.components["unet"].files[0].sha256 == \
        Pipeline.load(first).manifest.components["unet"].files[0].sha256
    traced: list[str] = []
    monkeypatch.setattr(export_tflite, "_trace", lambda exp, *a: traced.append(
        exp.contract.kind) or (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):  # other sizes: the UNet is not cached
        convert(models.checkpoint("tiny-sd1"), tmp_path / "sized", fmt="tflite",
                export_cache=models.exports, sizes="32x32", vae_encoder=False)
    assert traced == ["unet"]  # the text encoder, traced without sizes, was reused
    assert not (tmp_path / "sized").exists()

    from converters.export_cache import _config_text  # a path or a set's order: not the key
    assert _config_text({"a": 1, "_name_or_path": "./x", "_use_default_values": ["p", "q"]}) \
        == _config_text({"_use_default_values": ["q", "p"], "a": 1, "_name_or_path": "/y/x"})
    module = torch.nn.Linear(3, 2)
    key = export_key("unet", module, [(64, 64)])
    assert export_key("unet", module, [(64, 96)]) != key
    with torch.no_grad():
        module.weight[0, 0] += 1e-6
    assert export_key("unet", module, [(64, 64)]) != key

    def fails(path: Path) -> None:
        path.write_bytes(b"half")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        cached_export(open_cache(tmp_path / "c"), "unet", key, fails)
    assert list((tmp_path / "c").iterdir()) == []


@needs_tflite
def test_full_integer_unet_is_int8_inside_float_at_its_edges(models):
    """--precision int8-full: every convolution and fully connected layer of the UNet takes
    and makes int8 (calibrated on the runtime's own trajectories, at each size), its inputs
    and outputs stay float, and both sizes' images stay near the fp32 TFLite bundle's."""
    from ai_edge_litert.interpreter import Interpreter

    from converters.full_integer import FULL_INT_INPUTS
    prompts = models.root / "calibration-2.txt"  # 2 prompts, shared out over the 2 sizes
    prompts.write_text("a red circle on a blue background\ntwo small green squares\n")
    bundle = models.bundle("tiny-sd1", "int8-full", fmt="tflite", calibration=prompts,
                           **STATIC_STAGED)
    pipe = Pipeline.load(bundle)
    unet = pipe.manifest.components["unet"]
    q = pipe.manifest.converter["static_quantization"]
    assert unet.precision == "int8-full" and q["scheme"] == "int8-full"
    assert 0 < q["calibration_inputs"] <= FULL_INT_INPUTS
    assert {t.dtype for t in unet.inputs + unet.outputs} == {"float32"}
    it = Interpreter(str(bundle / unet.path))
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    heavy = [o for o in ops if o["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(heavy) > 10
    for op in heavy:  # input, weight and output all integer
        assert [tensors[i]["dtype"].__name__ for i in op["inputs"][:2]] == ["int8", "int8"]
        assert tensors[op["outputs"][0]]["dtype"].__name__ == "int8", op["op_name"]
    # every other op integer too: float only in the timestep embedding and the output's
    # DEQUANTIZE, and the manifest says which op types those are
    floats = [(o["op_name"], tensors[o["outputs"][0]]["name"]) for o in ops
              if tensors[o["outputs"][0]]["dtype"].__name__.startswith("float")]
    assert all("time_proj" in name or op == "DEQUANTIZE" for op, name in floats), floats
    assert sorted({op for op, name in floats if "time_proj" in name}) == q["float_ops"]
    assert sum(op == "DEQUANTIZE" for op, _ in floats) == 1
    from edge_sdk.cli import describe
    assert any(line.startswith("full int    int8-full, ") for line in describe(pipe.manifest,
                                                                           bundle))
    ref = Pipeline.load(models.bundle("tiny-sd1", fmt="tflite", **STATIC_STAGED))
    for shape in ((1, 4, 8, 8), (1, 4, 9, 13)):
        lat = np.random.default_rng(9).standard_normal(shape).astype(np.float32)
        got, want = _images(pipe, lat, steps=3), _images(ref, lat, steps=3)
        assert got.shape == want.shape
        # random tiny weights, 3 steps: 8.8/255 and 10.2/255 measured
        assert np.abs(got - want).mean() < 12, np.abs(got - want).mean()


@needs_tflite
def test_full_integer_calibration_that_would_not_fit_is_refused_first(models, monkeypatch):
    """int8-full's calibration keeps every tensor of a UNet call: a UNet whose tensors pass
    the memory available is refused, naming the way out, before any of it runs."""
    from converters.full_integer import check_calibration_fits
    from edge_sdk.errors import ConversionError
    unet = models.bundle("tiny-sd1", fmt="tflite", **STATIC_STAGED) / "unet.tflite"
    check_calibration_fits(unet)  # this machine has room for the tiny UNet
    monkeypatch.setattr("edge_sdk.estimate.available_bytes", lambda: 1 << 20)
    with pytest.raises(ConversionError, match="keeps every tensor of one UNet call.*0.0 GB "
                       "are available; convert at smaller --sizes"):
        check_calibration_fits(unet)
