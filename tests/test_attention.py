"""Query-chunked self-attention (bounded attention memory in the exported UNet graph)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import needs_convert

pytestmark = needs_convert


def _unet(models, arch):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(models.checkpoint(arch), subfolder="unet").eval()


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sd2"])
def test_chunked_attention_equals_whole_attention_in_torch(models, arch):
    import torch

    from converters.attention import ChunkedSelfAttnProcessor
    unet = _unet(models, arch)
    g = torch.Generator().manual_seed(0)
    # 12x20 latents = 240 tokens: 7 chunks do not divide it, the last slice is short
    x = torch.randn(2, 4, 12, 20, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.tensor([999.0, 10.0])
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        unet.set_attn_processor(ChunkedSelfAttnProcessor(7))
        got = unet(x, t, ctx).sample
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max())


def test_chunked_attention_equals_whole_attention_in_the_vae(models):
    import torch
    from diffusers import AutoencoderKL

    from converters.attention import ChunkedSelfAttnProcessor
    vae = AutoencoderKL.from_pretrained(models.checkpoint("tiny-sd1"), subfolder="vae").eval()
    z = torch.randn(1, 4, 10, 14, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vae.decode(z).sample
        vae.set_attn_processor(ChunkedSelfAttnProcessor(16))  # 140 tokens: uneven slices
        got = vae.decode(z).sample
    assert float((got - ref).abs().max()) < 1e-5


def test_chunked_unet_graph_serves_every_size_and_says_so(models, tmp_path):
    import onnx
    import onnxruntime as ort
    import torch

    from converters.convert import convert
    from edge_sdk.manifest import Manifest
    out = tmp_path / "b"
    convert(models.checkpoint("tiny-sd1"), out, attention_chunks=3, vae_encoder=False)
    manifest = Manifest.load(out)
    assert manifest.unet.attention_chunks == manifest.vae.attention_chunks == 3
    vae_graph = onnx.load(str(out / "vae_decoder.onnx"), load_external_data=False)
    assert sum(n.op_type == "Softmax" for n in vae_graph.graph.node) == 3
    graph = onnx.load(str(out / "unet.onnx"), load_external_data=False)
    softmax = sum(n.op_type == "Softmax" for n in graph.graph.node)
    # tiny-sd1: 2 transformer blocks down, 1 mid, 3 up; each a self-attention (now 3
    # slices) and a cross-attention (whole)
    assert softmax == 6 * 3 + 6
    sess = ort.InferenceSession(str(out / "unet.onnx"), providers=["CPUExecutionProvider"])
    unet = _unet(models, "tiny-sd1")
    rng = np.random.default_rng(1)
    for h, w in ((8, 8), (16, 24)):  # 64 and 384 tokens, neither the traced size
        x = rng.standard_normal((1, 4, h, w), dtype=np.float32)
        ctx = rng.standard_normal((1, 77, 32), dtype=np.float32)
        t = np.array([500.0], np.float32)
        (got,) = sess.run(["out_sample"], {"sample": x, "timestep": t,
                                           "encoder_hidden_states": ctx})
        with torch.no_grad():
            ref = unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
        assert np.abs(got - ref.numpy()).max() < 1e-4


def test_attention_chunks_auto_and_bad_values(models, tmp_path):
    from converters.attention import VAE_AUTO_CHUNKS, auto_chunks
    from converters.convert import convert
    from edge_sdk.errors import ConversionError
    assert auto_chunks(64) == 16  # SD 1.5: 4,096 tokens in slices of 256
    assert auto_chunks(96) == 36  # SD 2.x 768: 9,216 tokens
    assert auto_chunks(16) == 1  # the default model: 256 tokens, nothing to bound
    assert VAE_AUTO_CHUNKS > 1  # the VAE attends at the output size, whatever the native one
    for bad in ("0", "many", -2):
        with pytest.raises(ConversionError, match="attention chunks"):
            convert(models.checkpoint("tiny-sd1"), tmp_path / "x", attention_chunks=bad)
        assert not (tmp_path / "x").exists()


def test_memory_estimate_divides_attention_by_chunks():
    from dataclasses import replace

    from edge_sdk import GenerationConfig
    from edge_sdk.estimate import attention_bytes
    from edge_sdk.manifest import Manifest
    from edge_sdk.models import default_bundle
    m = Manifest.load(default_bundle())
    assert m.unet.attention_chunks == 1  # the default model's graph: whole attention
    cfg = GenerationConfig(seed=0, width=512, height=512, guidance_scale=1.0).resolve(m)
    chunked = replace(m, unet=replace(m.unet, attention_chunks=16))
    assert attention_bytes(chunked, cfg, 1) * 16 == attention_bytes(m, cfg, 1)

