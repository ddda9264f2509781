"""LoRAs fused at conversion (edge-convert --lora): UNet LoRAs in both key conventions against
diffusers' load_lora_weights, text-encoder LoRAs against a reference fused by hand, two at
once; and the LoRA reader's refusals."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk.errors import ConversionError, LoraError, SafetensorsError
from edge_sdk.lora import parse_lora_arg, read_lora

from .conftest import needs_convert
from .lora_files import fused_checkpoint, modules, write_lora

PROMPT = "a red circle on a blue background"
WIDTH, HEIGHT, STEPS, GUIDANCE = 96, 64, 6, 7.5
LEAN = dict(vae_encoder=False, vae_stages=False, feature_cache=False)  # what these tests use


def _latents() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)
                                                    ).astype(np.float32)


def _ours(bundle) -> np.ndarray:
    pipe = Pipeline.load(bundle)
    result = pipe.generate(PROMPT, GenerationConfig(steps=STEPS, guidance_scale=GUIDANCE,
                                                    width=WIDTH, height=HEIGHT,
                                                    scheduler="ddim"), latents=_latents())
    return pipe.decode_latents(result.latents)


def _diffusers(ckpt, loras) -> np.ndarray:
    """diffusers with each (file, scale) loaded as an adapter and the adapters' weights set."""
    import diffusers
    import torch
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        ckpt, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, [s for _, s in loras])
    with torch.no_grad():
        return pipe(PROMPT, latents=torch.from_numpy(_latents()), num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH,
                    output_type="np").images


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("loras")


def _bundle(models, loras):
    return models.bundle("tiny-sd1", loras=tuple((str(p), s) for p, s in loras), **LEAN)


@needs_convert
@pytest.mark.parametrize("convention", ["kohya", "peft"])
def test_unet_lora_matches_diffusers(models, lora_dir, convention):
    ckpt = models.checkpoint("tiny-sd1")
    path = write_lora(ckpt, lora_dir / f"unet-{convention}.safetensors", convention)
    loras = [(path, 0.8)]
    want, got = _diffusers(ckpt, loras), _ours(_bundle(models, loras))
    base = _ours(models.bundle("tiny-sd1", **LEAN))
    err = float(np.abs(got - want).max())
    assert err <= 2 / 255, f"{convention}: {err * 255:.2f}/255 from diffusers"
    assert float(np.abs(got - base).max()) > 10 / 255, "the LoRA changed nothing visible"


@needs_convert
def test_two_loras_at_once_match_diffusers(models, lora_dir):
    ckpt = models.checkpoint("tiny-sd1")
    loras = [(write_lora(ckpt, lora_dir / "two-a.safetensors", "kohya", seed=3), 0.6),
             (write_lora(ckpt, lora_dir / "two-b.safetensors", "peft", seed=4), -0.5)]
    err = float(np.abs(_ours(_bundle(models, loras)) - _diffusers(ckpt, loras)).max())
    assert err <= 2 / 255, f"{err * 255:.2f}/255 from diffusers"
    manifest = json.loads((_bundle(models, loras) / "manifest.json").read_text())
    assert [(x["file"], x["scale"]) for x in manifest["converter"]["loras"]] == \
        [("two-a.safetensors", 0.6), ("two-b.safetensors", -0.5)]


@needs_convert
@pytest.mark.parametrize("convention", ["kohya", "peft"])
def test_text_encoder_lora_matches_a_hand_fused_reference(models, lora_dir, convention,
                                                          tmp_path):
    ckpt = models.checkpoint("tiny-sd1")
    path = write_lora(ckpt, lora_dir / f"te-{convention}.safetensors", convention, unet=False,
                      text=True, seed=7, strength=0.5)
    loras = [(path, 0.7)]
    from converters.convert import convert
    ref = fused_checkpoint(ckpt, tmp_path / "fused", loras)
    convert(ref, tmp_path / "ref-bundle", **LEAN)
    want, got = _ours(tmp_path / "ref-bundle"), _ours(_bundle(models, loras))
    base = _ours(models.bundle("tiny-sd1", **LEAN))
    err = float(np.abs(got - want).max())
    assert err <= 2 / 255, f"{convention}: {err * 255:.2f}/255 from the hand-fused reference"
    assert float(np.abs(got - base).max()) > 10 / 255, "the LoRA changed nothing visible"


def test_parse_lora_arg():
    assert parse_lora_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_lora_arg("dir:with:colons/x.safetensors:-1e-1") == \
        ("dir:with:colons/x.safetensors", -0.1)
    assert parse_lora_arg("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)


def _write(path, tensors):
    from safetensors.numpy import save_file
    save_file(tensors, str(path))
    return path


PARAMS = {"unet": ["down_blocks.0.attentions.0.proj_in.weight",
                   "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
          "text_encoder": ["encoder.layers.0.self_attn.q_proj.weight"]}


def test_read_lora_refusals(tmp_path):
    a, b = np.ones((2, 8), np.float32), np.ones((8, 2), np.float32)
    unmatched = _write(tmp_path / "u.safetensors", {
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": a,
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": b})
    with pytest.raises(LoraError, match="2 of its 2 keys match no layer.*mid_block"):
        read_lora(unmatched, PARAMS)
    unknown = _write(tmp_path / "k.safetensors", {"lycoris_foo.hada_w1_a": a})
    with pytest.raises(LoraError, match="no LoRA convention.*lycoris_foo"):
        read_lora(unknown, PARAMS)
    half = _write(tmp_path / "h.safetensors", {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": a})
    with pytest.raises(LoraError, match="lacks its up matrix"):
        read_lora(half, PARAMS)
    ok = _write(tmp_path / "ok.safetensors", {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": a,
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": b})
    (layer,) = read_lora(ok, PARAMS)
    assert layer.param == "down_blocks.0.attentions.0.proj_in.weight" and layer.alpha == 2.0
    np.testing.assert_allclose(layer.delta(0.5, (8, 8, 1, 1), "x"),
                               np.full((8, 8, 1, 1), 0.5 * 2 / 2 * 2))
    with pytest.raises(LoraError, match="another base model"):
        layer.delta(1.0, (16, 8), "x")


def test_truncated_lora_header(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b'{"a": ')
    with pytest.raises(SafetensorsError, match="truncated"):
        read_lora(path, PARAMS)


@needs_convert
def test_lora_for_another_base_is_refused_before_export(models, tmp_path):
    """A LoRA made for a model whose cross-attention reads 1024-wide text (SD 2.x) against
    this one's: the keys match, the shapes do not."""
    ckpt = models.checkpoint("tiny-sd1")
    module, shape = next(iter(modules(ckpt, "unet", ("attn2.to_k",)).items()))
    key = "lora_unet_" + module.replace(".", "_")
    other = _write(tmp_path / "sd2.safetensors", {
        key + ".lora_down.weight": np.ones((4, 1024), np.float32),
        key + ".lora_up.weight": np.ones((shape[0], 4), np.float32)})
    from converters.convert import convert
    with pytest.raises(ConversionError, match="another base model"):
        convert(ckpt, tmp_path / "b", loras=((str(other), 1.0),))
    assert not (tmp_path / "b").exists()


def _image(pipe: Pipeline) -> np.ndarray:
    result = pipe.generate(PROMPT, GenerationConfig(steps=STEPS, guidance_scale=GUIDANCE,
                                                    width=WIDTH, height=HEIGHT,
                                                    scheduler="ddim"), latents=_latents())
    return pipe.decode_latents(result.latents)


@needs_convert
def test_load_time_lora_matches_conversion_time_and_switches(models, lora_dir):
    ckpt = models.checkpoint("tiny-sd1")
    both = write_lora(ckpt, lora_dir / "load-both.safetensors", "kohya", text=True, seed=11)
    unet = write_lora(ckpt, lora_dir / "load-unet.safetensors", "peft", seed=12)
    plain = models.bundle("tiny-sd1", **LEAN)
    fused = _ours(_bundle(models, [(both, 0.7)]))
    pipe = Pipeline.load(plain, loras={both: 0.7})
    err = float(np.abs(_image(pipe) - fused).max())
    assert err <= 1 / 255, f"load time vs conversion time: {err * 255:.2f}/255"
    # switching to a UNet-only LoRA reopens the UNet and the text encoder (back to its own
    # weights); switching to another UNet-only one leaves the text encoder's session open
    pipe.set_loras({unet: 0.5})
    text_session, unet_session = pipe.session("text_encoder"), pipe.session("unet")
    half = _image(pipe)
    pipe.set_loras({unet: -0.5})
    assert pipe.session("text_encoder") is text_session
    assert pipe.session("unet") is not unet_session
    assert float(np.abs(_image(pipe) - half).max()) > 10 / 255
    assert pipe.loras == {str(unet): -0.5}
    pipe.set_loras({})
    assert np.array_equal(_image(pipe), _ours(plain))


@needs_convert
def test_load_time_lora_on_fp16_and_refused_on_int8(models, lora_dir):
    ckpt = models.checkpoint("tiny-sd1")
    path = write_lora(ckpt, lora_dir / "load-fp16.safetensors", "kohya", text=True, seed=13)
    fp16 = models.bundle("tiny-sd1", "fp16", **LEAN)
    base = _image(Pipeline.load(fp16))
    got = _image(Pipeline.load(fp16, loras={path: 1.0}))
    want = _ours(models.bundle("tiny-sd1", "fp16", loras=((str(path), 1.0),), **LEAN))
    assert float(np.abs(got - base).max()) > 10 / 255
    err = float(np.abs(got - want).max())
    assert err <= 1 / 255, f"fp16: load time vs conversion time {err * 255:.2f}/255"
    with pytest.raises(LoraError, match="needs fp32/fp16 ONNX graphs.*int8.*--lora"):
        Pipeline.load(models.bundle("tiny-sd1", "int8", **LEAN), loras={path: 1.0})


@needs_convert
def test_generate_cli_applies_loras_at_load_time(models, lora_dir, tmp_path):
    from PIL import Image

    from edge_sdk.cli import main as sdk_main
    ckpt = models.checkpoint("tiny-sd1")
    path = write_lora(ckpt, lora_dir / "cli.safetensors", "kohya", text=True, seed=21)
    plain = models.bundle("tiny-sd1", **LEAN)
    out = tmp_path / "img.png"
    assert sdk_main(["generate", PROMPT, "--model", str(plain), "-o", str(out), "--steps", "3",
                     "--seed", "4", "--width", "96", "--height", "64", "--lora",
                     f"{path}:0.6", "--quiet"]) == 0
    want = Pipeline.load(plain, loras={path: 0.6})(PROMPT, steps=3, seed=4, width=96,
                                                   height=64)
    image = Image.open(out)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(want))
    assert json.loads(image.text["parameters"])["loras"] == {str(path): 0.6}


@needs_convert
def test_load_time_lora_reaches_the_shallow_branch(models, lora_dir):
    """Feature caching runs the UNet's shallow branch between whole steps: it takes the
    LoRA too (the same arrays as the UNet's, not copies)."""
    ckpt = models.checkpoint("tiny-sd1")
    path = write_lora(ckpt, lora_dir / "cache.safetensors", "kohya", seed=31)
    cached = dict(vae_encoder=False, vae_stages=False, feature_cache=True)
    fused = Pipeline.load(models.bundle("tiny-sd1", loras=((str(path), 0.9),), **cached))
    pipe = Pipeline.load(models.bundle("tiny-sd1", **cached), loras={path: 0.9})
    weights = pipe.components._weights
    shared = {id(a) for a in weights["unet"].values()} & \
        {id(a) for a in weights["unet_shallow"].values()}
    assert weights["unet_shallow"] and len(shared) == len(weights["unet_shallow"])
    config = GenerationConfig(steps=STEPS, guidance_scale=GUIDANCE, width=WIDTH,
                              height=HEIGHT, scheduler="ddim", cache_interval=2, seed=1)
    got, want = pipe.generate(PROMPT, config).latents, fused.generate(PROMPT, config).latents
    err = float(np.abs(pipe.decode_latents(got) - fused.decode_latents(want)).max())
    assert err <= 1 / 255, f"cached steps with a load-time LoRA: {err * 255:.2f}/255"
