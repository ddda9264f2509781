"""ControlNet: a bundle with ControlNets reproduces diffusers' StableDiffusionControlNetPipeline
(one ControlNet, two, guidance windows, guess mode), runs without control as the plain
model, quantized in low memory, from the command line, and from original-layout files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk.control import canny, control_array, preprocess, scribble
from edge_sdk.errors import ConversionError, InvalidInputError

from .conftest import needs_convert

pytestmark = needs_convert

PROMPT, NEGATIVE = "a red circle on a blue background", "blurry"
WIDTH, HEIGHT, STEPS, GUIDANCE = 96, 64, 6, 7.5


def _controls() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    first = (rng.random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    second = (rng.random((HEIGHT + 16, WIDTH - 8, 3)) * 255).astype(np.uint8)  # resized
    return first, second


def _latents() -> np.ndarray:
    return np.random.default_rng(7).standard_normal(
        (1, 4, HEIGHT // 8, WIDTH // 8)).astype(np.float32)


def _diffusers(models, images: list[np.ndarray], seeds: list[int], **kw):
    import diffusers
    import torch
    nets = [diffusers.ControlNetModel.from_pretrained(models.controlnet("tiny-sd1", s))
            for s in seeds]
    pipe = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        models.checkpoint("tiny-sd1"), controlnet=nets if len(nets) > 1 else nets[0],
        local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pil = [Image.fromarray(i) for i in images]
    with torch.no_grad():
        return pipe(PROMPT, negative_prompt=NEGATIVE, image=pil if len(pil) > 1 else pil[0],
                    latents=torch.from_numpy(_latents()), num_inference_steps=STEPS,
                    guidance_scale=GUIDANCE, height=HEIGHT, width=WIDTH, output_type="np",
                    **kw).images


def _ours(pipe: Pipeline, control, **kw) -> np.ndarray:
    result = pipe.generate(PROMPT, GenerationConfig(
        negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, width=WIDTH,
        height=HEIGHT, scheduler="ddim", **kw), latents=_latents(), control_image=control)
    return pipe.decode_latents(result.latents)


@pytest.fixture(scope="module")
def pipe(models) -> Pipeline:
    return Pipeline.load(models.control_bundle(2))


CASES = {  # name -> (ControlNets used, our control images, diffusers' kwargs = ours)
    "single": ([1], lambda a, b: [a, None], {"controlnet_conditioning_scale": 0.8}),
    "double, start/end": ([1, 2], lambda a, b: [a, b], {
        "controlnet_conditioning_scale": [0.7, 0.5], "control_guidance_start": [0.0, 0.2],
        "control_guidance_end": [0.8, 1.0]}),
    "double, guess mode": ([1, 2], lambda a, b: [a, b], {"guess_mode": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(models, pipe, case):
    seeds, ours_of, kw = CASES[case]
    first, second = _controls()
    want = _diffusers(models, [first, second][:len(seeds)], seeds, **kw)
    ours_kw = dict(kw)
    if len(seeds) == 1:  # the bundle holds two: one scale each, the second skipped
        ours_kw["controlnet_conditioning_scale"] = [kw["controlnet_conditioning_scale"], 1.0]
    got = _ours(pipe, ours_of(first, second), **ours_kw)
    err = float(np.abs(got - want).max())
    assert err <= 2 / 255, f"{case}: max abs diff {err * 255:.3f}/255"
    plain = pipe.decode_latents(pipe.generate(PROMPT, GenerationConfig(
        negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, width=WIDTH,
        height=HEIGHT, scheduler="ddim"), latents=_latents()).latents)
    assert float(np.abs(got - plain).max()) > 8 / 255, "the control changed nothing"


@pytest.mark.parametrize("case", ["double, start/end", "double, guess mode"])
def test_matches_diffusers_with_guidance_as_two_passes(models, case):
    """Memory mode low runs the guidance branches as two UNet calls (and the ControlNets
    per branch, or on the conditional one only in guess mode): the same image."""
    seeds, ours_of, kw = CASES[case]
    first, second = _controls()
    want = _diffusers(models, [first, second], seeds, **kw)
    low = Pipeline.load(models.control_bundle(2), memory="low")
    assert not low.plan.batch_cfg
    err = float(np.abs(_ours(low, ours_of(first, second), **kw) - want).max())
    assert err <= 2 / 255, f"{case}, low: max abs diff {err * 255:.3f}/255"


def test_the_output_takes_the_control_images_size(pipe):
    """As diffusers: with no width/height, the (first) control image's size, rounded down
    to what the model takes."""
    from edge_sdk.config import size_multiple
    m = size_multiple(pipe.manifest)
    control = np.zeros((2 * m + 3, 5 * m + 1, 3), np.uint8)
    image = pipe(PROMPT, steps=1, seed=0, control_image=[None, control])
    assert image.size == (5 * m, 2 * m)


def test_without_control_it_is_the_base_model(models, pipe):
    """Zero residuals: the same image as the bundle converted without ControlNets, with
    feature caching too (its shallow branch takes no residuals)."""
    base = Pipeline.load(models.bundle("tiny-sd1"))
    for interval in (1, 2):
        cfg = GenerationConfig(steps=4, seed=3, width=WIDTH, height=HEIGHT,
                               cache_interval=interval)
        want = base.generate(PROMPT, cfg).latents
        assert float(np.abs(pipe.generate(PROMPT, cfg).latents - want).max()) < 1e-5


def test_img2img_with_control(pipe):
    """A ControlNet steers img2img too (the control resized to the source's size)."""
    source = (np.random.default_rng(5).random((HEIGHT, WIDTH, 3)) * 255).astype(np.uint8)
    first, second = _controls()
    kw = dict(image=source, strength=0.6, steps=4, seed=2)
    plain = np.asarray(pipe(PROMPT, **kw), np.float32)
    steered = np.asarray(pipe(PROMPT, control_image=[first, second], **kw), np.float32)
    assert steered.shape == plain.shape == (HEIGHT, WIDTH, 3)
    assert np.abs(steered - plain).max() > 8


def test_windows_and_guess_mode_change_the_image(pipe):
    first, second = _controls()
    both = _ours(pipe, [first, second])
    late = _ours(pipe, [first, second], control_guidance_start=0.5)
    guess = _ours(pipe, [first, second], guess_mode=True)
    assert float(np.abs(both - late).max()) > 4 / 255
    assert float(np.abs(both - guess).max()) > 4 / 255


def test_the_manifest_records_the_controlnets(models, pipe):
    m = pipe.manifest
    assert [c.component for c in m.controlnets] == ["controlnet_0", "controlnet_1"]
    assert [c.name for c in m.controlnets] == ["controlnet-tiny-sd1-1", "controlnet-tiny-sd1-2"]
    assert len(m.unet.residuals) == len([t for t in m.components["unet"].inputs
                                         if "residual" in t.name])
    result = pipe.generate(PROMPT, GenerationConfig(steps=1, seed=0, width=WIDTH,
                                                    height=HEIGHT),
                           control_image=list(_controls()))
    assert len(result.parameters["control_image_sha256"]) == 2
    assert result.parameters["controlnet_conditioning_scale"] == (1.0, 1.0)


def test_int8_in_low_memory(models):
    """One ControlNet, int8 like the UNet, opened for the denoising and released after it
    in low memory; close to the fp32 bundle's image."""
    pipe = Pipeline.load(models.control_bundle(1, "int8"), memory="low")
    spec = pipe.manifest.components["controlnet_0"]
    assert spec.precision == "int8" and pipe.manifest.components["unet"].precision == "int8"
    first, _ = _controls()
    cfg = GenerationConfig(steps=4, seed=1, width=WIDTH, height=HEIGHT, guidance_scale=3.0)
    got = pipe.generate(PROMPT, cfg, control_image=first)  # one ControlNet: one image
    assert "controlnet_0" not in pipe.components.loaded
    plain = pipe.generate(PROMPT, cfg)
    ref = Pipeline.load(models.control_bundle(2)).generate(PROMPT, cfg,
                                                           control_image=[first, None])
    a, b, c = (np.asarray(r.images[0], np.float32) for r in (got, ref, plain))
    # the int8 ControlNet steered: nearer the fp32 steered image than its own plain one
    assert np.abs(a - b).mean() < 0.5 * np.abs(c - b).mean(), "int8 ControlNet did not steer"


def test_preprocessors():
    img = np.full((64, 96, 3), 240, np.uint8)
    img[16:48, 24:72] = (200, 30, 30)  # a red box on a light page
    edges = np.asarray(canny(img))
    assert edges.shape == (64, 96, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[16:48, 24].max() == 255 and edges[30, 40:60].max() == 0  # outline only
    iso = np.zeros((64, 96, 3), np.uint8)
    iso[:] = (40, 170, 60)  # green, and a red box 25 gray levels darker: found on colour
    iso[16:48, 24:72] = (220, 40, 40)
    assert np.asarray(canny(iso))[16:48, 24].max() == 255
    strokes = np.asarray(scribble(img))
    assert strokes[30, 40, 0] == 255 and strokes[2, 2, 0] == 0  # dark on light: the box
    inverted = np.asarray(scribble(255 - img))  # light strokes on a dark page: the same
    assert np.array_equal(inverted, strokes)
    assert np.array_equal(np.asarray(preprocess(img, "none")), img)
    with pytest.raises(InvalidInputError, match="unknown control preprocessor 'depth'"):
        preprocess(img, "depth")
    with pytest.raises(InvalidInputError, match="low <= high"):
        canny(img, 200, 100)


def test_cli_generates_with_a_preprocessed_control(models, tmp_path):
    from edge_sdk.cli import main
    src = tmp_path / "scene.png"
    img = np.full((64, 96, 3), 250, np.uint8)
    img[10:50, 30:70] = 20
    Image.fromarray(img).save(src)
    out, seen = tmp_path / "out.png", tmp_path / "seen.png"
    assert main(["generate", PROMPT, "-m", str(models.control_bundle(2)), "-o", str(out),
                 "--steps", "2", "--seed", "0", "--width", "48", "--height", "32",
                 "--control-image", str(src), "--control-image", "-",
                 "--control-preprocess", "canny", "--control-scale", "0.5",
                 "--control-scale", "1", "--save-control", str(seen), "--json"]) == 0
    saw = np.asarray(Image.open(seen))
    assert saw.shape == (32, 48, 3)  # resized to the output, as the ControlNet saw it
    fed = control_array(canny(img), 48, 32)[0].transpose(1, 2, 0)  # what the runtime feeds
    assert np.array_equal(saw, np.round(fed * 255).astype(np.uint8))
    params = json.loads(Image.open(out).text["parameters"])
    assert params["controlnet_conditioning_scale"] == [0.5, 1.0]


def test_original_layout_file_loads_the_same_weights(models, tmp_path):
    """An original-layout ControlNet file (control_model.*) reads into the weights of the
    diffusers folder it was written from (converters.controlnet's conversion)."""
    import torch
    from safetensors.torch import save_file

    from converters.controlnet import load_controlnet, read_controlnet
    from converters.checkpoint import Checkpoint

    from .single_files import controlnet_to_original
    folder = models.controlnet("tiny-sd1", 1)
    ckpt = Checkpoint.open(models.checkpoint("tiny-sd1"))
    src = read_controlnet(folder, ckpt.config("unet"), 4)
    ref = load_controlnet(src).state_dict()
    original = controlnet_to_original(ref, {**ckpt.config("unet"), **src.config})
    prefix = "control_model."
    for name, keys in (("control_tiny", original),  # and as some publish it: keys bare
                       ("bare", {k[len(prefix):]: v for k, v in original.items()})):
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in keys.items()}, str(path))
        single = read_controlnet(path, ckpt.config("unet"), 4)
        assert single.single_file and single.name == name
        got = load_controlnet(single).state_dict()
        assert set(got) == set(ref)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    other = Checkpoint.open(models.checkpoint("tiny-sd1")).config("unet")
    other = {**other, "block_out_channels": [64, 128]}  # a base of other widths: refused
    with pytest.raises(ConversionError, match="made for another base model"):
        read_controlnet(tmp_path / "bare.safetensors", other, 4)


class _Fake:
    """A session: records its feeds, returns `fn(feeds)`."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def run(self, feeds, outputs=None):
        self.calls.append(dict(feeds))
        return self.fn(feeds)


def test_controlled_predictor_with_fakes():
    """The window skips the ControlNet (zeros, no call); guess mode runs it on the
    conditional half only and ramps its residuals 0.1 -> 1; CFG combines as diffusers."""
    from types import SimpleNamespace

    from edge_sdk.contracts import ControlNetIO, UnetIO
    from edge_sdk.controlnet import (Control, ControlNet, control_keep, controlled_predictor,
                                     guess_scales)
    from edge_sdk.denoise import Conditioning
    manifest = SimpleNamespace(unet=SimpleNamespace(residuals=((2, 1), (2, 1))))
    def two(f, value):  # 2 channels, as manifest.unet.residuals says
        return np.full((f["sample"].shape[0], 2, 2, 2), value, np.float32)
    net = _Fake(lambda f: {ControlNetIO.down(0): two(f, 1.0), ControlNetIO.MID: two(f, 2.0)})
    # the UNet's output: its context plus the residuals' sum, to read what it was fed
    unet = _Fake(lambda f: {UnetIO.OUTPUT: f[UnetIO.CONTEXT].reshape(-1, 1, 1, 1)
                            + f[UnetIO.down_residual(0)].sum(1, keepdims=True)
                            + f[UnetIO.MID_RESIDUAL].sum(1, keepdims=True)})
    cond = Conditioning({UnetIO.CONTEXT: np.full((1, 1, 1), 10.0, np.float32)},
                        {UnetIO.CONTEXT: np.zeros((1, 1, 1), np.float32)})
    x = np.zeros((1, 1, 2, 2), np.float32)
    image = np.zeros((1, 3, 16, 16), np.float32)

    def predictor(guess: bool, start: float = 0.0) -> object:
        control = Control((ControlNet("controlnet_0", image, 0.5, start, 1.0),), guess)
        return controlled_predictor(unet, lambda role: net, control, manifest, cond, 3.0,
                                    (0, 4))
    out = predictor(False)(x, 999.0, 0)  # residuals 0.5 * 2 * (1 + 2) = 3 in each branch
    assert np.allclose(out, 3.0 + 3.0 * 10.0) and net.calls[-1]["sample"].shape[0] == 2
    ramp = guess_scales(2)
    out = predictor(True)(x, 999.0, 0)  # uncond: no residuals; cond: ramped
    assert net.calls[-1]["sample"].shape[0] == 1
    want_c = 10.0 + 0.5 * 2 * (ramp[0] * 1 + ramp[1] * 2)
    assert np.allclose(out, 0.0 + 3.0 * want_c)
    calls = len(net.calls)
    out = predictor(False, start=0.5)(x, 999.0, 1)  # step 1 of 4: before its window
    assert len(net.calls) == calls and np.allclose(out, 30.0)
    pooled = Control((ControlNet("controlnet_0", image, 0.5, global_pool=True),), True)
    out = controlled_predictor(unet, lambda role: net, pooled, manifest, cond, 3.0,
                               (0, 4))(x, 999.0, 0)  # guess mode, but no ramp (diffusers)
    assert np.allclose(out, 3.0 * (10.0 + 3.0))
    assert [control_keep(i, 4, 0.25, 0.75) for i in range(4)] == [0.0, 1.0, 1.0, 0.0]
    import torch
    assert np.allclose(guess_scales(13), torch.logspace(-1, 0, 13).numpy())
