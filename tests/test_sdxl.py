"""SDXL bundles reproduce diffusers' StableDiffusionXLPipeline on tiny SDXL-architecture
checkpoints (two text encoders, added conditions) at a non-square size: guided, with no
negative prompt (force_zeros_for_empty_prompt), with the second prompts, clip skip and
micro-conditioning, and Turbo-style in one step; and they convert and run as SD 1.x does."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk import InvalidInputError, Manifest, Pipeline
from edge_sdk import names as N

from .conftest import needs_convert

pytestmark = needs_convert

PROMPT = "a red circle on a blue background"
WIDTH, HEIGHT = 96, 64  # 12 x 8 latents: non-square
CASES = {
    "guided": dict(negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=6),
    # no negative prompt: the unconditional embeddings are zeros (force_zeros_for_empty_prompt)
    "no-negative": dict(guidance_scale=5.0, num_inference_steps=6),
    # an explicit "": encoded, not zeros
    "empty-negative": dict(negative_prompt="", guidance_scale=5.0, num_inference_steps=4),
    "dpmpp_2m": dict(negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=5,
                     scheduler="dpmpp_2m"),
    "second-prompts": dict(negative_prompt="blurry", prompt_2="a green cube",
                           negative_prompt_2="dark", guidance_scale=4.0,
                           num_inference_steps=5, clip_skip=1, original_size=(128, 160),
                           crops_coords_top_left=(8, 16), target_size=(64, 96)),
}


def _latents(seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def _diffusers(checkpoint, latents: np.ndarray, **kw) -> np.ndarray:
    import diffusers
    import torch
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(checkpoint,
                                                               local_files_only=True)
    if kw.pop("scheduler", None) == "dpmpp_2m":
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPT, latents=torch.from_numpy(latents), height=HEIGHT, width=WIDTH,
                    output_type="np", **kw).images


def _ours(pipe: Pipeline, latents: np.ndarray, **kw) -> np.ndarray:
    kw = dict(kw)
    if "num_inference_steps" in kw:
        kw["steps"] = kw.pop("num_inference_steps")
    result = pipe(PROMPT, latents=latents, height=HEIGHT, width=WIDTH, return_dict=True, **kw)
    return pipe.decode_latents(result.latents)


def _check(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape == (1, HEIGHT, WIDTH, 3)
    err = float(np.abs(got - want).max())
    assert err <= 2 / 255, f"{what}: max abs diff {err * 255:.2f}/255"


@pytest.mark.parametrize("case", list(CASES))
def test_sdxl_matches_diffusers(models, case):
    latents = _latents()
    want = _diffusers(models.checkpoint("tiny-sdxl"), latents, **CASES[case])
    _check(_ours(Pipeline.load(models.bundle("tiny-sdxl")), latents, **CASES[case]), want, case)


def test_turbo_one_step_matches_diffusers(models):
    """SDXL-Turbo's configuration: Euler ancestral, trailing spacing, 1 step, guidance 0 —
    the bundle's defaults, one conditional UNet call."""
    pipe = Pipeline.load(models.bundle("tiny-sdxl-turbo"))
    d = pipe.manifest.defaults
    assert (d.steps, d.guidance_scale) == (1, 0.0)
    assert pipe.manifest.scheduler["_class_name"] == "EulerAncestralDiscreteScheduler"
    calls = []
    unet = pipe.session(N.UNET)
    original = unet.run
    unet.run = lambda feeds: calls.append(feeds["sample"].shape[0]) or original(feeds)
    latents = _latents(3)
    got = _ours(pipe, latents)
    assert calls == [1]
    want = _diffusers(models.checkpoint("tiny-sdxl-turbo"), latents, num_inference_steps=1,
                      guidance_scale=0.0)
    _check(got, want, "turbo")


def test_the_parity_cases_are_sensitive(models):
    """What the parity tests pin down changes the image by more than twice their tolerance:
    zeros vs the empty prompt's embeddings, the time ids, the second prompt."""
    pipe = Pipeline.load(models.bundle("tiny-sdxl"))
    latents = _latents()
    base = _ours(pipe, latents, guidance_scale=5.0, steps=4)
    for kw in (dict(negative_prompt=""), dict(original_size=(512, 512)),
               dict(prompt_2="a green cube")):
        other = _ours(pipe, latents, guidance_scale=5.0, steps=4, **kw)
        assert float(np.abs(other - base).max()) > 4 / 255, kw  # twice the tolerance


def test_sdxl_bundle_describes_its_text_conditioning(models):
    m = Manifest.load(models.bundle("tiny-sdxl"))
    assert m.variant == "sdxl" and m.added_conditions
    assert m.text.encoders == (N.TEXT_ENCODER, N.TEXT_ENCODER_2) and m.text.penultimate
    assert m.text.pooled == N.TEXT_ENCODER_2 and m.text.force_zeros_for_empty_prompt
    assert {t.text_encoder for t in m.tokenizers.values()} == {N.TEXT_ENCODER,
                                                                N.TEXT_ENCODER_2}
    assert m.tokenizers[N.TOKENIZER_2].pad_token == "!"
    assert m.defaults.guidance_scale == 5.0  # diffusers' SDXL default
    assert N.UNET_SHALLOW not in m.components  # feature caching: not for SDXL yet


def test_fp16_conversion_keeps_the_sdxl_vae_and_the_embeddings_fp32(models):
    """The VAE stays fp32; in the fp16 UNet the sinusoidal embeddings of the timestep and
    of the time ids are computed in fp32 from the graph inputs on (no fp16 tensor on the
    data path into any Sin/Cos: fp16's step at 1024 is 1 radian)."""
    import onnx
    bundle = models.bundle("tiny-sdxl", "fp16")
    m = Manifest.load(bundle)
    assert m.components[N.UNET].precision == m.components[N.TEXT_ENCODER_2].precision == "fp16"
    assert m.components[N.VAE_DECODER].precision == "fp32"
    assert all(c.precision == "fp32" for r, c in m.components.items() if r.startswith("vae"))
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(bundle / "unet.onnx"),
                                                        load_external_data=False)).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info)
             + list(graph.input)}
    producer = {o: n for n in graph.node for o in n.output}
    trig = [n for n in graph.node if n.op_type in ("Sin", "Cos")]
    assert len(trig) == 4  # time_proj's and add_time_proj's
    for n in trig:
        stack, seen = list(n.input), set()
        while stack:
            t = stack.pop()
            assert types.get(t) != onnx.TensorProto.FLOAT16, (n.name, t)
            p = producer.get(t)
            if p is not None and p.op_type != "Shape" and t not in seen:  # data, not shapes
                seen.add(t)
                stack.extend(i for i in p.input if i)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_sdxl_in_low_memory(models, precision):
    """int8 / int4 bundles generate in memory mode low, close to fp32; the two text encoders
    are opened in turn (the first released before the second opens), as the UNet after."""
    ref = Pipeline.load(models.bundle("tiny-sdxl"))
    pipe = Pipeline.load(models.bundle("tiny-sdxl", precision), memory="low")
    opened: list[tuple[str, list[str]]] = []
    session = pipe.components.session
    pipe.components.session = lambda role: opened.append((role, pipe.components.loaded)) \
        or session(role)
    latents = _latents(5)
    got = np.asarray(pipe("a blue square", latents=latents, width=WIDTH, height=HEIGHT,
                          steps=3, seed=1), np.float32)
    want = np.asarray(ref("a blue square", latents=latents, width=WIDTH, height=HEIGHT,
                          steps=3, seed=1), np.float32)
    firsts = [(r, loaded) for r, loaded in opened if r.startswith("text_encoder")]
    assert [r for r, _ in firsts][:2] == [N.TEXT_ENCODER, N.TEXT_ENCODER_2]
    assert N.TEXT_ENCODER not in firsts[1][1]  # released before the second was opened
    psnr = 10 * np.log10(255.0 ** 2 / max(float(np.mean((got - want) ** 2)), 1e-9))
    assert psnr > 25, f"{precision}: PSNR {psnr:.1f} dB against fp32"


def test_added_conditions_are_resolved_and_recorded(models):
    pipe = Pipeline.load(models.bundle("tiny-sdxl"))
    result = pipe(PROMPT, width=WIDTH, height=HEIGHT, steps=1, seed=0, return_dict=True,
                  crops_coords_top_left=(0, 8))
    cfg = result.config
    assert cfg.original_size == cfg.target_size == (HEIGHT, WIDTH)
    assert cfg.time_ids == (HEIGHT, WIDTH, 0, 8, HEIGHT, WIDTH)
    assert result.parameters["crops_coords_top_left"] == (0, 8)


def test_sd_bundle_refuses_sdxl_parameters(models):
    pipe = Pipeline.load(models.bundle("tiny-sd1"))
    with pytest.raises(InvalidInputError, match="prompt_2: for SDXL models"):
        pipe(PROMPT, prompt_2="x", steps=1)
    with pytest.raises(InvalidInputError, match="prompt_2 / negative_prompt_2: for SDXL"):
        pipe.encode_prompt(PROMPT, prompt_2="x")


def test_long_and_weighted_prompts_read_by_both_encoders(models):
    """A prompt of two windows and a one-window prompt_2: both encoders' windows line up
    (the second padded with its empty prompt's); a weight changes both halves."""
    from edge_sdk.text_encoder import TextOptions
    pipe = Pipeline.load(models.bundle("tiny-sdxl"))
    long = ", ".join(["a small red circle on a blue background"] * 12)
    embeds = pipe.encode_prompt(long, guidance_scale=1.0, prompt_2="a cube",
                                text=TextOptions(long=True))
    assert embeds.cond.shape == (1, 2 * 77, 64) and embeds.pooled.shape == (1, 32)
    plain = pipe.encode_prompt("a red circle", guidance_scale=1.0).cond
    weighted = pipe.encode_prompt("a (red:1.5) circle", guidance_scale=1.0).cond
    for half in (slice(0, 32), slice(32, 64)):  # each encoder's features
        assert not np.allclose(plain[..., half], weighted[..., half], atol=1e-4)


def test_the_stages_compose_to_the_whole_generation(models):
    """encode_prompt -> denoise -> decode_latents, the public stages, give the one call's
    image: the pooled embeddings and time ids travel through them."""
    pipe = Pipeline.load(models.bundle("tiny-sdxl"))
    latents = _latents(2)
    whole = _ours(pipe, latents, negative_prompt="dark", guidance_scale=4.0, steps=3,
                  original_size=(128, 128))
    embeds = pipe.encode_prompt(PROMPT, "dark", guidance_scale=4.0)
    assert embeds.pooled is not None and embeds.uncond_pooled is not None
    final = pipe.denoise(embeds, latents, steps=3, guidance_scale=4.0, seed=0,
                         original_size=(128, 128))
    assert float(np.abs(pipe.decode_latents(final) - whole).max()) <= 1e-5


def test_sdxl_vae_decodes_exactly_in_tiles(models):
    """Tiled decoding (the low memory modes') with the SDXL bundle's VAE stages equals the
    whole decode."""
    pipe = Pipeline.load(models.bundle("tiny-sdxl"))
    latents = _latents(4) * 0.5
    whole = pipe.decode_latents(latents, tile=0)
    tiled = pipe.decode_latents(latents, tile=4)
    assert float(np.abs(tiled - whole).max()) <= 1 / 255


def test_verify_compares_what_sdxl_reads(models):
    """edge-convert verify, per component, on what a generation reads of it: each encoder's
    penultimate raw layer, the second's pooled projection, the UNet fed all its inputs."""
    from converters.verify import compare_components
    report = compare_components(Pipeline.load(models.bundle("tiny-sdxl", "int8")),
                                Pipeline.load(models.bundle("tiny-sdxl")))
    assert set(report["text_encoder_2"]["outputs"]) == {"hidden_layers", "text_embeds"}
    assert set(report["text_encoder"]["outputs"]) == {"hidden_layers"}
    for comp in ("text_encoder", "text_encoder_2", "unet"):
        assert 0 < report[comp]["rel_l2"] < 0.1, (comp, report[comp])
