"""What a user of the Python API and the command line relies on: every image of a batch can be
made again alone, files are written as the user's other files are, the CLI reports what it
did, and interrupted conversions leave nothing behind."""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from edge_sdk import Pipeline
from edge_sdk.cli import main as sdk_main

PROMPT = "a red circle on a blue background"


def test_each_image_of_a_batch_is_its_own_seeds_image():
    """Image k of `num_images=3, seed=4` is the image of seed 4 + k made alone, with the
    default model's ancestral sampler (fresh noise every step) too."""
    pipe = Pipeline.load()
    result = pipe.generate(PROMPT, __import__("edge_sdk").GenerationConfig(
        seed=4, num_images=3, steps=6))
    assert result.seeds == [4, 5, 6]
    for k, image in enumerate(result.images):
        alone = pipe(PROMPT, seed=4 + k, steps=6)
        assert np.array_equal(np.asarray(image), np.asarray(alone)), k
        assert result.image_parameters(k)["seed"] == 4 + k


def test_a_list_of_prompts_gives_each_prompts_images_in_order():
    pipe = Pipeline.load()
    prompts = [PROMPT, "two small green squares at the top"]
    images = pipe(prompts, seed=1, steps=4, num_images=2)
    assert len(images) == 4
    third = pipe(prompts[1], seed=3, steps=4)  # prompt 1's first image is image 2: seed 1 + 2
    assert np.array_equal(np.asarray(images[2]), np.asarray(third))


def test_cli_writes_numbered_files_tagged_with_their_seeds_and_honours_the_umask(
        tmp_path, capsys):
    old = os.umask(0o027)
    try:
        assert sdk_main(["generate", PROMPT, "-o", str(tmp_path / "img.png"), "--steps", "3",
                         "--seed", "4", "--num-images", "2", "--json"]) == 0
    finally:
        os.umask(old)
    report = json.loads(capsys.readouterr().out)
    assert [i["seed"] for i in report["images"]] == [4, 5]
    for k, item in enumerate(report["images"]):
        path = tmp_path / f"img-{k}.png"
        assert item["path"] == str(path)
        assert Image.open(path).info["seed"] == str(4 + k)
        assert os.stat(path).st_mode & 0o777 == 0o640  # 0666 less the umask, not 0600
    assert set(report["seconds"]) >= {"load", "text_encoder", "denoise", "vae_decoder"}


def test_cli_writes_jpeg_for_a_jpg_path(tmp_path):
    out = tmp_path / "a.jpg"
    assert sdk_main(["generate", PROMPT, "-o", str(out), "--steps", "2", "-q"]) == 0
    assert Image.open(out).format == "JPEG"


def test_the_schedulers_are_listed(capsys):
    from edge_sdk.schedulers import scheduler_names
    assert sdk_main(["schedulers"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in scheduler_names())
    assert "euler_a" in out and "EulerAncestralDiscreteScheduler" in out


def test_a_conversion_sweeps_what_killed_ones_left_for_any_target(tmp_path):
    """A staging folder of a conversion whose process is gone (SIGKILL, power loss) is
    removed by the next conversion in that folder, whatever bundle it was writing; a live
    process's is left alone."""
    from converters.bundle import STAGING_MARK, AtomicBundle
    dead = tmp_path / f".other-model.partial-{2**22 + 12345}"  # above Linux's pid_max default
    live = tmp_path / f".busy.partial-{os.getpid()}"
    unmarked = tmp_path / f".notes.partial-{2**22 + 1}"  # not made by edge-convert
    not_ours = tmp_path / ".ssh.old-2020"  # a user's backup, whatever its name says
    for folder in (dead, live, unmarked, not_ours):
        folder.mkdir()
        (folder / "unet.onnx").write_bytes(b"half")
    for folder in (dead, live):
        (folder / STAGING_MARK).write_text("1\n")
    # killed in the last instants: the mark already removed, the bundle complete; killed
    # right after mkdir; killed while discarding a replaced bundle (only the mark is left)
    done = tmp_path / f".model.partial-{2**22 + 2}"
    empty = tmp_path / f".model.partial-{2**22 + 3}"
    discarded = tmp_path / f".bundle.old-{2**22 + 4}"
    for folder in (done, empty, discarded):
        folder.mkdir()
    (done / "manifest.json").write_text("{}")
    (discarded / STAGING_MARK).write_text("1\n")
    with AtomicBundle(tmp_path / "bundle") as stage:
        (stage / "manifest.json").write_text("{}")
    assert not dead.exists() and live.exists() and unmarked.exists() and not_ours.exists()
    assert not done.exists() and not empty.exists() and not discarded.exists()
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == ["manifest.json"]


def test_diffusers_output_options_and_the_whole_result():
    pipe = Pipeline.load()
    image = pipe(PROMPT, seed=2, steps=3)
    arrays = pipe(PROMPT, seed=2, steps=3, output_type="np", num_images=1)
    assert arrays.shape == (128, 128, 3) and 0 <= arrays.min() and arrays.max() <= 1
    assert np.array_equal((arrays * 255).round().astype(np.uint8), np.asarray(image))
    result = pipe(PROMPT, seed=2, steps=3, output_type="latent", return_dict=True)
    assert isinstance(result.images, list) and result.images[0].shape == (4, 16, 16)
    assert np.array_equal(result.images[0], result.latents[0])
    import pytest

    from edge_sdk.errors import InvalidInputError
    with pytest.raises(InvalidInputError, match="output_type 'jpeg'"):
        pipe(PROMPT, output_type="jpeg")


def test_a_failing_callback_is_a_typed_error_naming_it():
    import pytest

    from edge_sdk.errors import CallbackError
    pipe = Pipeline.load()

    def callback(step, total, latents):
        if step == 1:
            raise KeyError("mine")
    with pytest.raises(CallbackError, match="step callback raised KeyError") as info:
        pipe(PROMPT, steps=3, callback=callback)
    assert isinstance(info.value.__cause__, KeyError)
    assert pipe(PROMPT, steps=2, seed=0).size == (128, 128)  # the pipeline still works


def test_embeddings_without_guidance_are_refused_for_a_guided_denoise():
    import pytest

    from edge_sdk.errors import InvalidInputError
    pipe = Pipeline.load()
    embeds = pipe.encode_prompt(PROMPT, guidance_scale=1.0)
    noise = np.zeros((1, 4, 16, 16), np.float32)
    with pytest.raises(InvalidInputError, match="encoded with guidance off"):
        pipe.denoise(embeds, noise, steps=2, guidance_scale=7.5)


def test_edge_convert_without_the_convert_extra_names_it(monkeypatch, capsys, tmp_path):
    """Not ModuleNotFoundError: torch, but one line naming the extra (the packages are
    hidden here as if not installed)."""
    import importlib.util

    from converters import cli
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "diffusers") else
                        real(name, *a))
    assert cli.main([str(tmp_path), "-o", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "[convert] extra" in err and "torch, diffusers missing" in err


def test_check_refuses_what_generate_would_before_any_work():
    from unittest import mock

    import pytest

    from edge_sdk import GenerationConfig
    from edge_sdk.errors import InvalidInputError
    pipe = Pipeline.load(memory="low")  # low opens no session at load
    cfg = pipe.check("a red circle", GenerationConfig(steps=3))
    assert cfg.steps == 3 and cfg.seed is not None and cfg.width == pipe.manifest.defaults.width
    for bad, match in (({"negative_prompt": "x" * 20_000}, "negative_prompt has 20000"),
                       ({"steps": 0}, "steps"), ({"num_images": 40}, None)):
        with pytest.raises(InvalidInputError, match=match):
            pipe.check(["a", "b"] if "num_images" in bad else "a", GenerationConfig(**bad))
    with mock.patch("edge_sdk.estimate.available_bytes", return_value=2**20):
        with pytest.raises(InvalidInputError, match="MiB is available"):
            pipe.check("a red circle")
    assert not pipe.components.loaded  # nothing was run or opened


def test_callback_on_step_end_sees_each_step_replaces_latents_and_interrupts():
    import pytest

    from edge_sdk import GenerationConfig
    from edge_sdk.errors import CancelledError, InvalidInputError
    pipe = Pipeline.load()
    seen = []

    def record(p, step, t, kw):
        seen.append((p is pipe, step, t, kw["latents"].shape))
        return kw
    base = pipe("a red circle", seed=1, steps=4, output_type="np", callback_on_step_end=record)
    sched = pipe.scheduler(GenerationConfig(steps=4).resolve(pipe.manifest))
    assert [s[:3] for s in seen] == [(True, i, float(t)) for i, t in enumerate(sched.timesteps)]
    zeroed = pipe("a red circle", seed=1, steps=4, output_type="np",
                  callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0})
    assert np.abs(zeroed - base).max() > 0.1  # the returned latents were used

    def stop(p, i, t, kw):
        p._interrupt = i == 1
        return kw
    with pytest.raises(CancelledError, match="step 2/4"):
        pipe("a red circle", seed=1, steps=4, callback_on_step_end=stop)
    assert pipe.interrupt and pipe("x", steps=1) is not None and not pipe.interrupt
    for bad in ({"callback_on_step_end": 5},
                {"callback_on_step_end": record, "callback_on_step_end_tensor_inputs": ["noise"]},
                {"callback_on_step_end": record, "callback": lambda *a: None}):
        with pytest.raises(InvalidInputError):
            pipe("x", steps=1, **bad)
