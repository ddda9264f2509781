"""Each numpy scheduler matches diffusers' own, step by step, over the SD-family options."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edge_sdk.schedulers import create_scheduler

torch = pytest.importorskip("torch")
ds = pytest.importorskip("diffusers.schedulers")

SCHEDULERS = {
    "DDIMScheduler": ("ddim", ["epsilon", "v_prediction", "sample"]),
    "PNDMScheduler": ("pndm", ["epsilon", "v_prediction"]),
    "EulerDiscreteScheduler": ("euler", ["epsilon", "v_prediction", "sample"]),
    "EulerAncestralDiscreteScheduler": ("euler_a", ["epsilon", "v_prediction"]),
    "DPMSolverMultistepScheduler": ("dpmpp_2m", ["epsilon", "v_prediction", "sample"]),
    "LCMScheduler": ("lcm", ["epsilon", "v_prediction", "sample"]),
}
CASES = [(cls, pt, spacing, beta)
         for cls, (_, pts) in SCHEDULERS.items() for pt in pts
         for spacing in ("leading", "trailing", "linspace")
         for beta in ("scaled_linear", "linear")]
# Options each algorithm honours, and the values tried (every combination).
OPTIONS = {
    "DDIMScheduler": {"steps_offset": [0, 1], "set_alpha_to_one": [True, False],
                      "clip_sample": [True, False]},
    "PNDMScheduler": {"steps_offset": [0, 1], "set_alpha_to_one": [True, False],
                      "skip_prk_steps": [True, False]},
    "EulerDiscreteScheduler": {"steps_offset": [0, 1], "use_karras_sigmas": [False, True]},
    "EulerAncestralDiscreteScheduler": {"steps_offset": [0, 1]},
    "DPMSolverMultistepScheduler": {"steps_offset": [0, 1], "use_karras_sigmas": [False, True],
                                    "solver_order": [2, 3]},
    "LCMScheduler": {"steps_offset": [0, 1], "clip_sample": [True, False],
                     "set_alpha_to_one": [True, False]},
}
SD_BETAS = {"scaled_linear": (0.00085, 0.012), "linear": (0.0001, 0.02)}


def _run_pair(class_name: str, config: dict, steps: int, seed: int) -> float:
    ref = getattr(ds, class_name).from_config(config)
    ref.set_timesteps(steps)
    ours = create_scheduler(class_name, config, steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=0, atol=1e-3)
    # 1e-4 or 1e-7 of sigma, whichever is larger: zero terminal SNR puts sigma_max at 4096,
    # where one float32 ulp is 5e-4 and hosts differ in it (4095.99976 vs 4096.0 on an AMD
    # EPYC host)
    ref_sigma = float(ref.init_noise_sigma)
    assert abs(ours.init_noise_sigma - ref_sigma) <= max(1e-4, 1e-7 * ref_sigma)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        shape = (2, 4, 6, 5)
        sample = (rng.standard_normal(shape) * ours.init_noise_sigma).astype(np.float32)
        out = rng.standard_normal(shape).astype(np.float32)
        noise = rng.standard_normal(shape).astype(np.float32)
        ref_in = ref.scale_model_input(torch.from_numpy(sample), t).numpy()
        np.testing.assert_allclose(ours.scale_model_input(sample, i), ref_in, atol=1e-5, rtol=1e-6)
        _patch_noise(class_name, noise)
        ref_out = ref.step(torch.from_numpy(out), t, torch.from_numpy(sample)).prev_sample.numpy()
        our_out = ours.step(i, sample, out, noise=noise)
        assert our_out.dtype == np.float32
        # an absolute bound (the assert below), plus 1e-6 of the largest value the step
        # works on: with linear betas samples reach ~400, where one float32 ulp is already
        # 3e-5, and DPM-Solver's x0 predictions reach ~60x the sample (torch's sqrt/log also
        # differ from numpy's in the last ulp). SD's scaled_linear schedules stayed within 1e-5
        # absolute on the earlier CI host; 3rd-order DPM-Solver, which sums three outputs with large
        # coefficients, reached 1.2e-5 on an AMD EPYC host with the same packages, hence 2e-5.
        history = [o for o in getattr(ours, "_outputs", []) if o is not None]
        scale = max([float(np.abs(a).max()) for a in [sample, *history]])
        excess = np.abs(our_out - ref_out) - 1e-6 * scale
        worst = max(worst, float(excess.max()))
    return worst


@pytest.fixture(autouse=True)
def _restore_noise():
    """Put back the diffusers schedulers' own randn_tensor after each test: _patch_noise
    replaces it, and a later test running diffusers' pipelines (the SDXL-Turbo parity)
    drew this module's fixed noise of another shape."""
    import importlib
    mods = [importlib.import_module(f"diffusers.schedulers.{m}")
            for m in ("scheduling_euler_ancestral_discrete", "scheduling_lcm")]
    saved = [(m, m.randn_tensor) for m in mods]
    yield
    for m, fn in saved:
        m.randn_tensor = fn


def _patch_noise(class_name: str, noise: np.ndarray) -> None:
    """Make diffusers draw exactly `noise` (the ancestral noise both sides receive)."""
    import importlib
    module = {"EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
              "LCMScheduler": "scheduling_lcm"}.get(class_name)
    if module:
        mod = importlib.import_module(f"diffusers.schedulers.{module}")
        mod.randn_tensor = lambda *a, **k: torch.from_numpy(noise.copy())


@pytest.mark.parametrize("class_name,prediction_type,spacing,beta", CASES)
def test_matches_diffusers_step_by_step(class_name, prediction_type, spacing, beta):
    opts = OPTIONS[class_name]
    for values in itertools.product(*opts.values()):
        config = {"_class_name": class_name, "num_train_timesteps": 1000,
                  "beta_start": SD_BETAS[beta][0], "beta_end": SD_BETAS[beta][1],
                  "beta_schedule": beta, "prediction_type": prediction_type,
                  "timestep_spacing": spacing, **dict(zip(opts, values))}
        for steps in (4, 13, 25):
            if class_name == "PNDMScheduler" and not config["skip_prk_steps"] and steps < 5:
                continue
            worst = _run_pair(class_name, config, steps, seed=steps)
            assert worst < 2e-5, f"{config} steps={steps}: max abs diff {worst:.3g}"


ZERO_SNR = ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
            "DPMSolverMultistepScheduler", "LCMScheduler"]


@pytest.mark.parametrize("class_name", ZERO_SNR)
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_zero_terminal_snr_matches_diffusers(class_name, spacing):
    """`rescale_betas_zero_snr` (Lin et al. 2023), as the shipped default model uses it:
    v-prediction, the first step at pure noise."""
    config = {"_class_name": class_name, "num_train_timesteps": 1000, "beta_start": 0.00085,
              "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "prediction_type": "v_prediction", "timestep_spacing": spacing,
              "rescale_betas_zero_snr": True}
    for steps in (4, 20):
        worst = _run_pair(class_name, config, steps, seed=steps)
        assert worst < 1e-5, f"{config} steps={steps}: max abs diff {worst:.3g}"


@pytest.mark.parametrize("class_name", list(SCHEDULERS))
@pytest.mark.parametrize("begin", [0, 3, 7])
def test_add_noise_and_a_run_from_a_begin_index_match_diffusers(class_name, begin):
    """img2img's path: the clean latents noised to step `begin`, then the steps from there,
    as diffusers' img2img pipeline drives its schedulers (set_begin_index where the class
    has one, the timesteps from `begin` on)."""
    config = {"_class_name": class_name, "num_train_timesteps": 1000, "beta_start": 0.00085,
              "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
              "skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False}
    ref = getattr(ds, class_name).from_config(config)
    ref.set_timesteps(10)
    if hasattr(ref, "set_begin_index"):
        ref.set_begin_index(begin)
    ours = create_scheduler(class_name, config, 10)
    ours.set_begin_index(begin)
    rng = np.random.default_rng(begin)
    x0, noise = (rng.standard_normal((1, 4, 6, 5)).astype(np.float32) for _ in range(2))
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise),
                         ref.timesteps[begin:begin + 1]).numpy()
    sample = ours.add_noise(x0, noise, begin)
    np.testing.assert_allclose(sample, want, atol=1e-5, rtol=1e-6)
    for i in range(begin, 10):
        t = ref.timesteps[i]
        out, step_noise = (rng.standard_normal(x0.shape).astype(np.float32) for _ in range(2))
        _patch_noise(class_name, step_noise)
        ref_in = ref.scale_model_input(torch.from_numpy(sample), t).numpy()
        np.testing.assert_allclose(ours.scale_model_input(sample, i), ref_in, atol=1e-5,
                                   rtol=1e-6)
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(sample)).prev_sample.numpy()
        sample = ours.step(i, sample, out, noise=step_noise)
        np.testing.assert_allclose(sample, want, atol=1e-4, rtol=1e-5)
