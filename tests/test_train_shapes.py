"""The default model's training script (models/shapes/train.py): its timestep sampling, the
late-centre switch, and a tiny end-to-end run that must be deterministic and give a
checkpoint edge-convert and the runtime accept (the full recipe takes ~53 CPU minutes)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_convert

pytestmark = needs_convert
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "models" / "shapes" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("shapes_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("centre", [300, 400, 500])
def test_logit_normal_timesteps_centre_where_asked(train, centre):
    import torch
    t = train.sample_timesteps(20000, torch.Generator().manual_seed(0), mid=1.0,
                               centre=centre).numpy()
    assert t.min() >= 0 and t.max() <= 999
    assert abs(np.median(t) - centre) < 15
    # logit-normal(0, 1): about 2/3 of the draws within one logit unit of the centre
    lo, hi = (1000 / (1 + np.exp(-(np.log(centre / (1000 - centre)) + s))) for s in (-1, 1))
    assert 0.63 < np.mean((t >= lo) & (t <= hi)) < 0.73


def test_no_mid_fraction_means_uniform_timesteps(train):
    import torch
    t = train.sample_timesteps(20000, torch.Generator().manual_seed(0), mid=0.0,
                               centre=300).numpy()
    counts = np.histogram(t, bins=10, range=(0, 1000))[0]
    assert counts.min() > 1800 and counts.max() < 2200  # 2000 expected per decile


def test_uniform_then_mid_then_late_phases(train, monkeypatch, tmp_path):
    """`uniform_steps` first (no logit-normal draws), `late_steps` last (the late centre)."""
    import torch
    from edge_sdk.shapes.scenes import random_scene
    seen: list[tuple[float, int]] = []
    real = train.sample_timesteps

    def spy(n, gen, mid=0.0, centre=500):
        seen.append((mid, centre))
        return real(n, gen, mid, centre)

    monkeypatch.setattr(train, "sample_timesteps", spy)
    tok = train.build_tokenizer(tmp_path / "tokenizer", 0)
    _, unet, text = train.make_models(len(tok), tok.bos_token_id, tok.eos_token_id,
                                      text_time=True)
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(4)]
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    train.train_unet(unet, text, tok, latents, scenes, steps=6, batch=2, seed=0, warmup=1,
                     mid_timesteps=0.7, mid_centre=500, uniform_steps=2,
                     late_steps=3, late_centre=350)
    assert seen == [(0.0, 500)] * 2 + [(0.7, 500)] + [(0.7, 350)] * 3


def _tiny_run(out: Path) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), "-o", str(out), "--seed", "3",
                    "--vae-steps", "2", "--pool", "64", "--unet-steps", "3",
                    "--unet-batch", "4", "--late-steps", "1", "--late-centre", "300"],
                   check=True, cwd=ROOT, capture_output=True)
    return json.loads((out / "training.json").read_text())


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_a_tiny_run_is_reproducible_and_converts(tmp_path):
    from converters.convert import convert
    from edge_sdk import Pipeline
    first, second = _tiny_run(tmp_path / "a"), _tiny_run(tmp_path / "b")
    weights = _digest(tmp_path / "a")
    assert {k.split("/")[0] for k in weights} == {"vae", "unet", "text_encoder"}
    assert weights == _digest(tmp_path / "b")  # same seed, same host: the same bytes
    assert (first["late_steps"], first["late_centre"]) == (1, 300)
    assert first["parameters"] == second["parameters"]
    assert first["parameters"]["unet"] > 1_000_000  # the shipped architecture, not a toy
    # the sampler the recipe names is the one the shipped checkpoint (and bundle) default to
    shipped = ROOT / "models" / "shapes" / "checkpoint" / "scheduler" / "scheduler_config.json"
    ours = json.loads((tmp_path / "a" / "scheduler" / "scheduler_config.json").read_text())
    theirs = json.loads(shipped.read_text())
    theirs.pop("_diffusers_version")  # another diffusers may also add keys of its own
    assert {k: ours.get(k) for k in theirs} == theirs
    assert ours["_class_name"] == "EulerAncestralDiscreteScheduler"
    convert(tmp_path / "a", tmp_path / "bundle", precision="fp32", vae_encoder=False,
            default_steps=2, name="tiny-shapes")
    image = Pipeline.load(tmp_path / "bundle")("a red circle on a blue background", seed=0)
    assert image.size == (128, 128)


def test_a_tiny_controlnet_run_saves_a_controlnet_that_converts(tmp_path):
    """train_controlnet.py for 2 steps on 64 scenes: a ControlNet of the shipped UNet's
    layout, converted into a bundle with it, steering the generation."""
    from converters.convert import convert
    from edge_sdk import Pipeline
    from edge_sdk.shapes.controlled import cases
    script = ROOT / "models" / "shapes" / "train_controlnet.py"
    out = tmp_path / "cn"
    subprocess.run([sys.executable, str(script), "-o", str(out), "--steps", "2", "--batch",
                    "4", "--pool", "64", "--validate", "0", "--warmup", "1", "--lr", "0.05"],
                   check=True, cwd=ROOT, capture_output=True)
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 2 and info["parameters"] > 1_000_000
    convert(ROOT / "models" / "shapes" / "checkpoint", tmp_path / "bundle", controlnets=(out,),
            vae_encoder=False, vae_stages=False, feature_cache=False, default_steps=2)
    pipe = Pipeline.load(tmp_path / "bundle")
    case = cases(1)[0]
    plain = np.asarray(pipe(case.prompt, seed=0), np.float32)
    steered = np.asarray(pipe(case.prompt, seed=0, control_image=case.control), np.float32)
    assert np.abs(steered - plain).max() > 4  # 2 steps at a high rate moved the zero convs
