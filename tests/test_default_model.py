"""End to end on the shipped default model: it is found with no bundle given, and what it
generates shows what the prompt says (read back by the evaluator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_sdk import Pipeline
from edge_sdk.models import default_bundle
from edge_sdk.shapes.evaluator import analyse


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load()  # no bundle: the shipped model


def test_default_bundle_is_the_shipped_model():
    assert (default_bundle() / "manifest.json").is_file()


@pytest.mark.parametrize("prompt,seed,colour,background", [
    ("a red circle on a blue background", 0, "red", "blue"),
    ("a large yellow star on the left, black background", 1, "yellow", "black"),
    ("two small green squares at the top on a white background", 2, "green", "white"),
])
def test_generates_the_prompted_colours(pipe, prompt, seed, colour, background):
    image = pipe(prompt, seed=seed)
    assert image.size == (128, 128)
    seen = analyse(np.asarray(image))
    assert seen.colour == colour, seen
    assert seen.background == background, seen


def test_the_readme_prompt_gives_a_red_circle_on_blue(tmp_path):
    """The README's first command, as a user runs it (no model argument), over fixed seeds so
    the test is deterministic; the evaluator must read back all three things it says."""
    from edge_sdk.cli import main
    for k in range(6):
        out = tmp_path / f"out{k}.png"
        assert main(["generate", "a red circle on a blue background", "-o", str(out),
                     "--seed", str(k)]) == 0
        from PIL import Image
        image = Image.open(out)
        assert image.size == (128, 128)
        seen = analyse(np.asarray(image.convert("RGB")))
        assert (seen.colour, seen.shape, seen.background) == ("red", "circle", "blue"), seen


def test_selftest_passes_on_the_shipped_model_and_fails_on_a_wrong_image(tmp_path, capsys,
                                                                           monkeypatch):
    from edge_sdk import cli
    out = tmp_path / "selftest.png"
    assert cli.main(["selftest", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "selftest PASS" in text and "evaluator sees red" in text and out.is_file()
    # the check can fail: a prompt the model draws in another colour makes it say FAIL
    monkeypatch.setattr(cli, "SELFTEST_PROMPT", "a green square on a white background")
    assert cli.main(["selftest"]) == 1
    assert "selftest FAIL" in capsys.readouterr().out


def test_evaluate_prints_the_table_and_writes_files_only_where_asked(tmp_path, capsys,
                                                                     monkeypatch):
    import json

    from edge_sdk.cli import main
    monkeypatch.chdir(tmp_path)  # a stray contact sheet would land here
    assert main(["evaluate", "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert "whole" in text and "2 prompts in" in text
    assert list(tmp_path.iterdir()) == []
    sheet, report = tmp_path / "out" / "sheet.png", tmp_path / "r.json"
    sheet.parent.mkdir()
    assert main(["evaluate", "--limit", "2", "--sheet", str(sheet), "--json", str(report)]) == 0
    from PIL import Image
    assert Image.open(sheet).size[0] > 2 * 128
    rows = json.loads(report.read_text())["rows"]
    assert len(rows) == 2 and {"colour", "shape", "whole"} <= set(rows[0]["score"])


def test_evaluate_extends_the_prompt_set_keeping_the_standard_set_first(capsys):
    from edge_sdk.cli import main
    from edge_sdk.shapes.scenes import HELD_OUT_SEED, VALIDATION_SEED, evaluation_prompts
    for seed in (VALIDATION_SEED, HELD_OUT_SEED):
        assert evaluation_prompts(320, seed)[:80] == evaluation_prompts(80, seed)
    assert len({p for _, p, _ in evaluation_prompts(320, VALIDATION_SEED)}) > 200
    assert main(["evaluate", "--prompts", "0"]) != 0
    assert "at least 1" in capsys.readouterr().err


def test_the_evaluator_judges_the_shapes_model_in_any_conversion_and_no_other(models, capsys):
    from edge_sdk import Manifest, cli
    from edge_sdk.shapes import is_shapes_model
    converted = Manifest.load(models.bundle("shapes", vae_encoder=False, default_steps=20,
                                            default_guidance=2.0))  # test_tflite's, shared
    assert converted.source.name != "shapes" and is_shapes_model(converted)  # by fingerprint
    tiny = models.bundle("tiny-sd1")
    assert not is_shapes_model(Manifest.load(tiny))
    assert cli.main(["selftest", "--model", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "selftest PASS (generation only" in out and "evaluator sees" not in out


def test_the_few_step_model_is_found_by_name_and_draws_the_readme_prompt(tmp_path,
                                                                         monkeypatch):
    """shapes-lcm: an LCM UNet at 4 steps, by name from Python and the CLI; a folder of
    that name where the user stands wins over the shipped model."""
    from edge_sdk.cli import main
    from edge_sdk.models import resolve_model, shipped_bundle
    pipe = Pipeline.load("shapes-lcm")
    m = pipe.manifest
    assert m.unet.time_cond_proj_dim == 256 and m.defaults.steps == 4
    assert pipe.bundle == shipped_bundle("shapes-lcm")
    hits = 0
    for k in range(4):
        seen = analyse(np.asarray(pipe("a red circle on a blue background", seed=k)))
        hits += (seen.colour, seen.shape, seen.background) == ("red", "circle", "blue")
    assert hits >= 3, hits
    out = tmp_path / "lcm.png"
    assert main(["generate", "a red circle on a blue background", "--model", "shapes-lcm",
                 "-o", str(out), "--seed", "0"]) == 0 and out.is_file()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes-lcm").mkdir()
    assert resolve_model("shapes-lcm") == Path("shapes-lcm")


def test_the_shipped_controlnet_follows_edge_maps(capsys, tmp_path):
    """The default bundle's ControlNet on the first 8 held-out cases of its protocol (a
    scene's Canny edges, the prompt naming only a colour and background): the shape and
    place are read from the edges in most (measured on 64: see models/shapes/README.md)."""
    import json

    from edge_sdk.cli import main
    report = tmp_path / "control.json"
    assert main(["evaluate", "--task", "control", "--prompts", "8", "--json",
                 str(report)]) == 0
    summary = json.loads(report.read_text())["summary"]
    assert summary["cases"] == 8
    assert summary["follows"] >= 62.5 and summary["colour"] >= 62.5, summary
