"""Quantized bundles on the tiny checkpoints: they run, they shrink, their error is bounded,
and `edge-convert verify` reports it."""

from __future__ import annotations

import json

import numpy as np

from converters.cli import main as convert_main
from edge_sdk import GenerationConfig, Manifest, Pipeline

from .conftest import needs_convert

pytestmark = needs_convert


def psnr_vs(reference, bundle) -> float:
    """PSNR (dB) of `bundle`'s image against `reference`'s, same prompt and initial noise."""
    latents = np.random.default_rng(2).standard_normal((1, 4, 8, 8)).astype(np.float32)
    cfg = GenerationConfig(steps=8, guidance_scale=5.0, scheduler="euler")
    images = []
    for b in (reference, bundle):
        pipe = Pipeline.load(b)
        images.append(pipe.decode_latents(pipe.generate("a red circle", cfg, latents=latents)
                                          .latents))
    return 10 * float(np.log10(1 / np.mean((images[0] - images[1]) ** 2)))


def test_int8_runs_shrinks_and_stays_close(models):
    fp32, int8 = models.bundle("tiny-sd1"), models.bundle("tiny-sd1", "int8")
    m32, m8 = Manifest.load(fp32), Manifest.load(int8)
    assert m8.components["unet"].precision == "int8"
    assert m8.components["vae_decoder"].precision == "fp32"  # the VAE stays fp32 by default
    size = lambda m, c: sum(f.size for f in m.components[c].files)  # noqa: E731
    assert size(m8, "unet") < 0.45 * size(m32, "unet")
    # its token embedding too (a Gather, not a MatMul: once left fp32, the whole of it)
    assert size(m8, "text_encoder") < 0.35 * size(m32, "text_encoder")
    ids = {"input_ids": np.arange(77, dtype=np.int64)[None] % 1000}
    e32, e8 = (Pipeline.load(b).session("text_encoder").run(ids)["last_hidden_state"]
               for b in (fp32, int8))
    assert np.abs(e8 - e32).max() < 0.05 * np.abs(e32).max()
    assert psnr_vs(fp32, int8) > 30, "int8 image PSNR vs fp32 below 30 dB"


def test_int8_graph_has_integer_ops_and_no_fp32_weights_left(models):
    import collections

    import onnx
    int8 = models.bundle("tiny-sd1", "int8")
    g = onnx.load(str(int8 / "unet.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in g.node)
    assert ops["ConvInteger"] > 0 and ops["MatMulInteger"] > 0
    assert ops["Conv"] == 0 and ops["Gemm"] == 0  # every weight layer was rewritten
    inits = {t.name for t in g.initializer}
    # the MatMuls left are activation x activation (attention), with no weight input
    assert all(not (set(n.input) & inits) for n in g.node if n.op_type == "MatMul")


def test_uint8_per_tensor_round_trips_within_half_a_step():
    from converters.quantize import uint8_per_tensor
    rng = np.random.default_rng(0)
    for w in (rng.standard_normal((64, 32)).astype(np.float32),
              np.abs(rng.standard_normal((8, 3, 3, 3))).astype(np.float32) + 0.5,  # all > 0
              np.zeros((4, 4), np.float32)):
        w.flat[0] = 0.0
        q, scale, zp = uint8_per_tensor(w)
        assert q.dtype == np.uint8 and q.shape == w.shape and scale > 0
        back = (q.astype(np.float32) - float(zp)) * float(scale)
        assert np.abs(back - w).max() <= float(scale) / 2 + 1e-6
        assert q.flat[0] == zp  # zero is exactly representable (padding, ReLU outputs)


def test_verify_writes_quality_report(models, capsys):
    int8 = models.bundle("tiny-sd1", "int8")
    assert convert_main(["verify", str(int8), "--reference",
                         str(models.checkpoint("tiny-sd1")), "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "unet" in out
    report = json.loads((int8 / "quality.json").read_text())
    assert report["components"]["unet"]["precision"] == "int8"
    assert 0 < report["components"]["unet"]["rel_l2"] < 0.1
    assert report["components"]["vae_decoder"]["max_abs"] < 1e-4  # fp32 in both
    assert report["end_to_end"]["psnr"] > 30 and len(report["end_to_end"]["images"]) == 8


def test_blockwise_int4_codes_and_scales():
    from converters.quantize import blockwise_int4
    w = np.random.default_rng(0).standard_normal((6, 70, 3, 3)).astype(np.float32)
    q, scale = blockwise_int4(w, axis=1, block_size=32)
    assert q.shape == w.shape and scale.shape == (6, 3, 3, 3)  # ceil(70 / 32) blocks
    assert q.min() >= -7 and q.max() <= 7
    rebuilt = q * np.repeat(scale, 32, axis=1)[:, :70]
    assert np.all(np.abs(rebuilt - w) <= np.repeat(scale, 32, axis=1)[:, :70] / 2 + 1e-6)


def test_int4_tensor_is_what_onnxruntime_dequantizes(tmp_path):
    """Our nibble packing and scale layout, read back by ORT's DequantizeLinear."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from converters.quantize import _int4_tensor, blockwise_int4
    w = np.random.default_rng(1).standard_normal((5, 33)).astype(np.float32)
    q, scale = blockwise_int4(w, axis=0, block_size=16)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0, block_size=16)],
        "dq", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5, 33])],
        [_int4_tensor("q", q), numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {})
    np.testing.assert_allclose(y, q * np.repeat(scale, 16, axis=0)[:5], rtol=1e-6)


def test_int4_runs_shrinks_and_stays_close(models):
    fp32, int4 = models.bundle("tiny-sd1"), models.bundle("tiny-sd1", "int4")
    m32, m4 = Manifest.load(fp32), Manifest.load(int4)
    assert m4.components["unet"].precision == "int4"
    assert m4.components["text_encoder"].precision == "int8"
    size = lambda m, c: sum(f.size for f in m.components[c].files)  # noqa: E731
    assert size(m4, "unet") < 0.3 * size(m32, "unet")  # tiny layers keep more fp32 than SD
    assert psnr_vs(fp32, int4) > 24, "int4 image PSNR vs fp32 below 24 dB"


def test_static_int8_is_calibrated_and_stays_close(models, tmp_path):
    from converters.convert import convert
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration\na red circle\n\na cat on a table\n")
    out = tmp_path / "static"
    m = convert(models.checkpoint("tiny-sd1"), out, precision="int8", int8_method="static",
                calibration=prompts, vae_encoder=False, default_steps=4)
    assert m.converter["int8_method"] == "static"
    assert m.components["unet"].precision == "int8"
    import onnx
    ops = {n.op_type for n in onnx.load(str(out / "unet.onnx"), load_external_data=False)
           .graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # activations quantized too
    assert psnr_vs(models.bundle("tiny-sd1"), out) > 25
