"""Single-file checkpoints (edge-convert model.safetensors): tiny checkpoints written out in
the original layout give the image their diffusers folder gives; the shipped family configs
fit the full-size layouts; detection, ambiguity and every refusal."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk.errors import ConversionError

from .conftest import needs_convert
from .lora_files import write_lora
from .single_files import layout_shapes, original_layout, sparse_file, write_single_file

pytestmark = needs_convert
PROMPT = "a red circle on a blue background"
WIDTH, HEIGHT, STEPS = 64, 64, 4
LEAN = dict(vae_encoder=False, vae_stages=False, feature_cache=False)
TEXT = {"tiny-sd1": "clip", "tiny-inpaint": "clip", "tiny-sd2": "open_clip",
        "tiny-sdxl": "sdxl"}


def _image(bundle, arch: str) -> np.ndarray:
    extra = {"image": np.full((HEIGHT, WIDTH, 3), 200, np.uint8),
             "mask_image": np.tri(HEIGHT, WIDTH, dtype=np.uint8) * 255} \
        if arch == "tiny-inpaint" else {}
    latents = np.random.default_rng(5).standard_normal((1, 4, HEIGHT // 8, WIDTH // 8))
    pipe = Pipeline.load(bundle)
    result = pipe.generate(PROMPT, GenerationConfig(steps=STEPS, guidance_scale=7.5, seed=0,
                                                    width=WIDTH, height=HEIGHT,
                                                    scheduler="ddim"),
                           latents=latents.astype(np.float32), **extra)
    return pipe.decode_latents(result.latents)


@pytest.fixture(scope="module")
def files(models, tmp_path_factory):
    """Each tiny architecture as an original-layout single file."""
    root = tmp_path_factory.mktemp("single-files")
    return {arch: write_single_file(models.checkpoint(arch), root / f"{arch}.safetensors",
                                    text) for arch, text in TEXT.items()}


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sd2", "tiny-inpaint", "tiny-sdxl"])
def test_single_file_gives_the_folders_image(models, files, tmp_path, arch):
    """SD 1.x, SD 2.x v-prediction (OpenCLIP text encoder, linear projections), a
    9-channel inpainting UNet and SDXL (conditioner.embedders: CLIP and OpenCLIP with its
    projection, label_emb), read with --config (the tiny architectures are no shipped
    family)."""
    from converters.convert import convert
    ckpt = models.checkpoint(arch)
    # compared with the session's default bundles (shared with other tests); inpainting
    # reads the image, so that one keeps its VAE encoder
    options = dict(LEAN, vae_encoder=arch == "tiny-inpaint")
    manifest = convert(files[arch], tmp_path / "b", config=ckpt, **options)
    assert manifest.converter["source"]["format"] == "single-file"
    assert manifest.prediction_type == ("v_prediction" if arch == "tiny-sd2" else "epsilon")
    assert manifest.unet.in_channels == (9 if arch == "tiny-inpaint" else 4)
    ours, folder = _image(tmp_path / "b", arch), _image(models.bundle(arch), arch)
    assert np.abs(ours - folder).max() * 255 <= 1.0


def test_single_file_with_a_separate_vae_and_a_lora(models, files, tmp_path):
    """SD 1.x through the CLI: the file without its VAE, the VAE given with --vae (original
    layout, as published), a LoRA on UNet and text encoder matched against the layers the
    configs build; the same LoRA fused into the folder's conversion."""
    from safetensors.numpy import load_file, save_file

    from converters.cli import main
    from converters.convert import convert
    ckpt = models.checkpoint("tiny-sd1")
    single = write_single_file(ckpt, tmp_path / "novae.safetensors", vae=False)
    vae = {k.removeprefix("first_stage_model."): v for k, v in load_file(
        str(files["tiny-sd1"])).items() if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    lora = write_lora(ckpt, tmp_path / "style.safetensors", "kohya", text=True)
    assert main([str(single), "--config", str(ckpt), "--vae",
                 str(tmp_path / "vae.safetensors"), "--lora", f"{lora}:0.7", "--no-vae-encoder",
                 "--no-vae-stages", "--no-feature-cache", "-o", str(tmp_path / "b")]) == 0
    convert(ckpt, tmp_path / "ref", loras=((lora, 0.7),), **LEAN)
    ours, ref = _image(tmp_path / "b", "tiny-sd1"), _image(tmp_path / "ref", "tiny-sd1")
    assert np.abs(ours - ref).max() * 255 <= 1.0
    source = json.loads((tmp_path / "b" / "manifest.json").read_text())["converter"]["source"]
    assert source["vae"]["file"] == "vae.safetensors" and source["family"] == "--config"


def _weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_fp16_and_pickle_files_and_diffusers_layout_vae(models, files, tmp_path):
    """Half-precision files load as their values widened; a .ckpt only with allow_pickle;
    CLIP keys without transformers' text_model level (older files); --vae in diffusers'
    layout, and for a folder checkpoint too."""
    import torch

    from converters.checkpoint import open_checkpoint
    from safetensors.numpy import load_file, save_file
    ckpt = models.checkpoint("tiny-sd1")
    folder = open_checkpoint(ckpt)
    half = write_single_file(ckpt, tmp_path / "half.safetensors", dtype=np.float16)
    got = _weights(open_checkpoint(half, config=ckpt).load_unet())
    want = _weights(folder.load_unet())
    assert all(np.array_equal(got[k], want[k].astype(np.float16).astype(np.float32))
               for k in want)
    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in
                               load_file(str(files["tiny-sd1"])).items()}}, pickled)
    with pytest.raises(ConversionError, match="--allow-pickle"):
        open_checkpoint(pickled, config=ckpt)
    got = _weights(open_checkpoint(pickled, True, config=ckpt).load_text_encoder())
    assert all(np.array_equal(got[k], v) for k, v in _weights(folder.load_text_encoder()
                                                               ).items())
    old = {k.replace("transformer.text_model.", "transformer."): v
           for k, v in load_file(str(files["tiny-sd1"])).items()}  # pre-text_model keys
    save_file(old, str(tmp_path / "old.safetensors"))
    got = _weights(open_checkpoint(tmp_path / "old.safetensors", config=ckpt)
                   .load_text_encoder())
    assert all(np.array_equal(got[k], v) for k, v in _weights(folder.load_text_encoder()
                                                               ).items())
    shifted = {k: v + 0.01 for k, v in load_file(
        str(ckpt / "vae" / "diffusion_pytorch_model.safetensors")).items()}
    save_file(shifted, str(tmp_path / "vae.safetensors"))
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
              .replace("to_out.0.", "proj_attn."): v for k, v in shifted.items()}
    assert legacy != shifted  # (diffusers' VAE attention names before `Attention`)
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    for source, file in ((ckpt, "vae"), (files["tiny-sd1"], "vae"), (ckpt, "legacy")):
        vae = _weights(open_checkpoint(source, config=None if source == ckpt else ckpt,
                                       vae=tmp_path / f"{file}.safetensors").load_vae())
        assert all(np.array_equal(vae[k], v) for k, v in shifted.items())


@pytest.mark.parametrize("family,prediction", [("sd1", "epsilon"), ("sd1-inpainting", "epsilon"),
                                               ("sd2", "v_prediction"), ("sd2", "epsilon"),
                                               ("sd2-inpainting", "epsilon"),
                                               ("sdxl", "epsilon")])
def test_shipped_configs_fit_the_full_size_layouts(family, prediction):
    """The full-size architectures built from the shipped configs (weights on the meta
    device: no memory), written out in the original layout: detected as their family, and
    every converted weight fits."""
    from converters.single_file_layout import read_layout
    from converters.single_file_weights import check_shapes
    configs, _, original = original_layout(family, prediction)
    shapes = layout_shapes(original)
    assert read_layout(shapes, family).family == family
    text = {"sd2": "open_clip", "sdxl": "sdxl"}.get(family[:4].rstrip("-"), "clip")
    for name in original:  # every weight fits, and none of the UNet's is left over
        check_shapes(name, shapes, configs[name], text, name)
    stray = "model.diffusion_model." + ("label_emb.1.0.weight" if family == "sdxl"
                                        else "label_emb.0.0.weight")
    with pytest.raises(ConversionError, match="no place in this architecture.*label_emb"):
        check_shapes("unet", {**shapes, stray: (8, 8)}, configs["unet"], text, "unet")


def test_sdxl_turbo_single_file_takes_turbos_configs(tmp_path):
    """An SDXL file is read as SDXL; `--family sdxl-turbo` gives Turbo's configs (a file
    cannot tell them apart). Full size, sparse: the header and meta tensors only."""
    from converters.checkpoint import open_checkpoint
    path = sparse_file(tmp_path / "xl.safetensors", layout_shapes(original_layout("sdxl")[2]))
    xl = open_checkpoint(path)
    assert xl.is_xl and xl.family == "sdxl" and xl.config("unet")["sample_size"] == 128
    turbo = open_checkpoint(path, family="sdxl-turbo")
    sched = turbo.config("scheduler")
    assert turbo.family == "sdxl-turbo" and turbo.config("unet")["sample_size"] == 64
    assert (sched["_class_name"], sched["timestep_spacing"]) == (
        "EulerAncestralDiscreteScheduler", "trailing")
    assert (turbo.path / "tokenizer_2").is_dir() and turbo.model_index[
        "force_zeros_for_empty_prompt"]


SD2_SHAPES = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
              "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
                  (320, 1024),
              "first_stage_model.decoder.conv_out.weight": (3, 128, 3, 3),
              "cond_stage_model.model.token_embedding.weight": (49408, 1024)}


def test_sd2_prediction_type_is_asked_for_or_read_from_what_the_file_states(tmp_path):
    """Full-size SD 2.x headers (sparse files: the data is never read)."""
    from converters.checkpoint import open_checkpoint
    full = layout_shapes(original_layout("sd2")[2])
    plain = sparse_file(tmp_path / "sd2.safetensors", full)
    with pytest.raises(ConversionError, match="--prediction-type v_prediction.*epsilon"):
        open_checkpoint(plain)
    ckpt = open_checkpoint(plain, prediction_type="v_prediction")
    assert ckpt.config("scheduler")["prediction_type"] == "v_prediction"
    assert ckpt.config("unet")["sample_size"] == 96
    assert ckpt.config("text_encoder")["num_hidden_layers"] == 23
    stated = sparse_file(tmp_path / "spec.safetensors", full,
                        {"modelspec.prediction_type": "v"})
    assert open_checkpoint(stated).prediction_type == "v_prediction"
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    parameterization: \"v\"  # v\n")
    assert open_checkpoint(plain).prediction_type == "v_prediction"
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    parameterization: x0\n")
    with pytest.raises(ConversionError, match="parameterization 'x0'.*--prediction-type"):
        open_checkpoint(plain)
    (tmp_path / "sd2.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    base = open_checkpoint(plain)
    assert base.prediction_type == "epsilon" and base.config("unet")["sample_size"] == 64
    tok = base.load_tokenizer()  # the shipped family's: CLIP's vocabulary, SD 2.x's padding
    assert (len(tok), tok.pad_token, tok.model_max_length) == (49408, "!", 77)
    sd1 = open_checkpoint(sparse_file(tmp_path / "sd1.safetensors",
                                      layout_shapes(original_layout("sd1")[2])))
    assert (sd1.family, sd1.load_tokenizer().pad_token) == ("sd1", "<|endoftext|>")
    inpaint = layout_shapes(original_layout("sd2-inpainting")[2])
    ckpt = open_checkpoint(sparse_file(tmp_path / "in.safetensors", inpaint),
                           prediction_type="epsilon")
    assert ckpt.family == "sd2-inpainting" and ckpt.config("unet")["in_channels"] == 9
    assert ckpt.pipeline_class == "StableDiffusionInpaintPipeline"
    # a wrong --family is found from the header, before anything is loaded or exported
    with pytest.raises(ConversionError, match="UNet.*weights do not fit.*wrong shape"):
        open_checkpoint(plain, family="sd1")


@pytest.mark.parametrize("shapes,message", [
    ({"conditioner.embedders.0.transformer.x": (1,), **SD2_SHAPES}, "SDXL"),
    ({"embedder.model.visual.proj": (1280, 1024), **SD2_SHAPES}, "unCLIP"),
    ({**SD2_SHAPES, "model.diffusion_model.input_blocks.0.0.weight": (320,)},
     "input_blocks.0.0.weight has shape \\(320,\\), not 4 dimensions"),
    ({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": (4, 320)}, "--lora"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)},
     "--vae"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "no Stable Diffusion UNet.*"
                                                             "double_blocks"),
    ({k: v for k, v in SD2_SHAPES.items() if "cond_stage" not in k}, "no text encoder"),
    ({k: v for k, v in SD2_SHAPES.items() if "first_stage" not in k}, "no VAE.*--vae"),
])
def test_files_that_are_no_sd_checkpoint_are_named(tmp_path, shapes, message):
    from converters.checkpoint import open_checkpoint
    with pytest.raises(ConversionError, match=message):
        open_checkpoint(sparse_file(tmp_path / "x.safetensors", shapes),
                        prediction_type="epsilon")


def test_unknown_architecture_and_option_refusals(files, models, tmp_path):
    from converters.checkpoint import open_checkpoint
    from converters.convert import convert
    with pytest.raises(ConversionError, match="unknown architecture.*--config DIR"):
        open_checkpoint(files["tiny-sd1"])  # tiny: no shipped family
    with pytest.raises(ConversionError, match="--family and --config"):
        convert(files["tiny-sd1"], tmp_path / "b", family="sd1", config=models.root)
    with pytest.raises(ConversionError, match="--family.*single-file"):
        open_checkpoint(models.checkpoint("tiny-sd1"), family="sd1")
    with pytest.raises(ConversionError, match="missing.*text_encoder/config.json"):
        open_checkpoint(files["tiny-sd1"], config=tmp_path)
    with pytest.raises(ConversionError, match="weights do not fit.*wrong shape"):
        open_checkpoint(files["tiny-sd1"], config=models.checkpoint("tiny-sd2")).load_unet()
    bad = tmp_path / "bad-config"
    shutil.copytree(models.checkpoint("tiny-sd1"), bad)
    unet = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps(
        dict(unet, down_block_types=["NoSuchBlock2D", "CrossAttnDownBlock2D"])))
    with pytest.raises(ConversionError, match="UNet config does not describe a model.*"
                                              "NoSuchBlock2D"):
        open_checkpoint(files["tiny-sd1"], config=bad)
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ConversionError, match="pickle.*--allow-pickle"):
        open_checkpoint(tmp_path / "model.bin")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(ConversionError, match="not a checkpoint file"):
        open_checkpoint(tmp_path / "model.txt")
    (tmp_path / "cut.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{")
    with pytest.raises(ConversionError, match="truncated"):
        open_checkpoint(tmp_path / "cut.safetensors")
