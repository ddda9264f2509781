"""Scheduler behaviour that needs no reference implementation (runs without torch)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_sdk.errors import InvalidInputError, SchedulerError
from edge_sdk.schedulers import create_scheduler, resolve_scheduler, scheduler_names

SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "skip_prk_steps": True, "steps_offset": 1,
        "set_alpha_to_one": False, "clip_sample": False, "num_train_timesteps": 1000}


def test_checkpoint_scheduler_is_default():
    cls, cfg = resolve_scheduler(None, SD15)
    assert cls.class_name == "PNDMScheduler" and cfg["steps_offset"] == 1


@pytest.mark.parametrize("name", scheduler_names())
def test_every_name_runs_to_a_finite_sample(name):
    steps = 4
    s = create_scheduler(name, SD15, steps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32) * np.float32(s.init_noise_sigma)
    for i in range(len(s.timesteps)):
        x = s.step(i, x, s.scale_model_input(x, i) * 0.1, rng=rng)
    assert np.isfinite(x).all() and x.dtype == np.float32


def test_karras_alias_sets_option():
    _, cfg = resolve_scheduler("dpmpp_2m_karras", SD15)
    assert cfg["use_karras_sigmas"] is True


@pytest.mark.parametrize("name", ["ddim", "DDIMScheduler"])
def test_swapped_in_ddim_does_not_clip_latents_unless_the_config_says(name):
    dpm = {k: v for k, v in SD15.items() if k != "clip_sample"}
    dpm["_class_name"] = "DPMSolverMultistepScheduler"
    assert resolve_scheduler(name, dpm)[1]["clip_sample"] is False
    x0 = np.full((1, 4, 8, 8), 3.0, np.float32)  # |x0| > 1, as latents often are
    s = create_scheduler(name, {**dpm, "prediction_type": "sample"}, 10)
    sample = np.zeros_like(x0)
    for i in range(len(s.timesteps)):
        sample = s.step(i, sample, x0)
    assert float(sample.min()) > 2.9  # ends at x0 (~3), not at a clipped 1
    assert resolve_scheduler(name, {**dpm, "clip_sample": True})[1]["clip_sample"] is True


def test_steps_out_of_order_rejected():
    s = create_scheduler("dpmpp_2m", SD15, 5)
    x = np.zeros((1, 4, 2, 2), np.float32)
    s.step(0, x, x)
    with pytest.raises(SchedulerError, match="in order"):
        s.step(2, x, x)


@pytest.mark.parametrize("cfg,match", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"timestep_spacing": "random"}, "timestep_spacing"),
    ({"prediction_type": "flow"}, "prediction_type"),
])
def test_unsupported_options_are_named(cfg, match):
    with pytest.raises(SchedulerError, match=match):
        create_scheduler("euler", {**SD15, **cfg}, 4)


def test_unknown_name():
    with pytest.raises(SchedulerError, match="choose one of"):
        create_scheduler("heun9000", SD15, 4)


def test_lcm_steps_limit():
    with pytest.raises(InvalidInputError, match="original_inference_steps"):
        create_scheduler("lcm", SD15, 51)
