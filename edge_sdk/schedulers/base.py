"""What every scheduler shares: config resolution, noise schedules, sigma conversions.

Configs use diffusers' names, so a checkpoint's `scheduler_config.json` loads unchanged.
Numerics follow diffusers (float32 schedules, the same rounding of timesteps), because the
runtime is tested to match it step by step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import InvalidInputError, SchedulerError

__all__ = ["Scheduler", "alphas_cumprod", "sigmas_of", "karras_sigmas", "sigma_to_t",
           "threshold_sample", "leading_or_trailing", "discrete_timesteps", "x0_and_eps", "clamp_x0"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SPACINGS = ("leading", "trailing", "linspace")


class Scheduler(ABC):
    """One denoising schedule for a fixed number of steps.

    Create one per generation. `timesteps[i]` is what the UNet gets at call `i`; call
    `scale_model_input(sample, i)` before the UNet and `step(i, sample, model_output)` after
    it, for i = begin_index, begin_index + 1, ... in order (multistep methods keep history,
    so the order is checked). `set_begin_index(k)` starts the run at step k (img2img's
    strength), where `add_noise(x0, noise, k)` puts a clean sample.
    """

    class_name: ClassVar[str]  # diffusers class name, e.g. "EulerDiscreteScheduler"
    defaults: ClassVar[dict[str, Any]]  # diffusers' __init__ defaults
    supported: ClassVar[dict[str, tuple[Any, ...]]] = {}  # option -> accepted values
    stochastic: ClassVar[bool] = False  # consumes noise in step()

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        self.config = self.resolve_config(config)
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InvalidInputError(f"steps must be an integer >= 1, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps
        self.alphas_cumprod = alphas_cumprod(self.config)
        self.init_noise_sigma = 1.0
        # alpha_bar "before" the first training step, where DDIM-style steps end
        self.final_alpha_cumprod = 1.0 if self.config.get("set_alpha_to_one", True) \
            else float(self.alphas_cumprod[0])
        self.begin_index = 0
        self.step_index: int | None = None  # the last step taken (None: none yet)

    # -- config --------------------------------------------------------------------------
    @classmethod
    def resolve_config(cls, given: Mapping[str, Any]) -> dict[str, Any]:
        """diffusers' `from_config`: the class defaults, updated with the keys it knows."""
        cfg = dict(cls.defaults)
        cfg.update({k: v for k, v in given.items() if k in cls.defaults})
        checks: dict[str, tuple[Any, ...]] = {
            "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
            "prediction_type": PREDICTION_TYPES,
            "timestep_spacing": SPACINGS,
            **cls.supported,
        }
        for key, allowed in checks.items():
            if key in cfg and cfg[key] not in allowed:
                raise SchedulerError(
                    f"{cls.class_name}: {key}={cfg[key]!r} is not supported by the edge-sdk "
                    f"runtime; supported: {list(allowed)}")
        return cfg

    # -- the loop ------------------------------------------------------------------------
    timesteps: np.ndarray

    def set_begin_index(self, begin_index: int) -> None:
        """Start denoising at step `begin_index` instead of 0 (before any step)."""
        if self.step_index is not None:
            raise SchedulerError(f"{self.class_name}: set_begin_index after a step was taken")
        if not 0 <= begin_index < len(self.timesteps):
            raise InvalidInputError(f"begin index {begin_index} is outside the "
                                    f"{len(self.timesteps)} steps")
        self.begin_index = begin_index

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        return sample

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """`original` (clean latents) noised to the level the UNet expects at step `i`:
        sqrt(a_t) x0 + sqrt(1 - a_t) noise (DDPM's forward process, eq. 4)."""
        a_t = self.alphas_cumprod[int(self.timesteps[i])]  # float32, as diffusers
        return (a_t**0.5 * original + (1 - a_t) ** 0.5 * noise).astype(np.float32)

    def step(self, i: int, sample: np.ndarray, model_output: np.ndarray,
             rng: np.random.Generator | None = None,
             noise: np.ndarray | None = None) -> np.ndarray:
        """Advance from timestep `i` to `i + 1`. Stochastic schedulers take `noise` (a
        standard-normal array shaped like `sample`) or draw it from `rng`."""
        expected = self.begin_index if self.step_index is None else self.step_index + 1
        if i != expected:
            raise SchedulerError(f"{self.class_name}.step called with i={i}, expected "
                                 f"{expected}: steps must run in order (create a new scheduler "
                                 "for a new generation)")
        if self.stochastic and noise is None:
            if rng is None:
                rng = np.random.default_rng()
            noise = rng.standard_normal(sample.shape, dtype=np.float32)
        out = self._step(i, sample.astype(np.float32, copy=False),
                         model_output.astype(np.float32, copy=False), noise)
        self.step_index = i
        return out.astype(np.float32, copy=False)

    @abstractmethod
    def _step(self, i: int, sample: np.ndarray, model_output: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray: ...

    def _check_steps_limit(self, limit: int, what: str) -> None:
        if self.num_inference_steps > limit:
            raise InvalidInputError(f"{self.class_name}: steps={self.num_inference_steps} exceeds "
                                    f"{what} ({limit}); use fewer steps")


def betas(cfg: Mapping[str, Any]) -> np.ndarray:
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        b = np.asarray(cfg["trained_betas"], dtype=np.float32)
    elif cfg["beta_schedule"] == "linear":
        b = _linspace32(cfg["beta_start"], cfg["beta_end"], n)
    elif cfg["beta_schedule"] == "scaled_linear":  # the LDM schedule: linear in sqrt(beta)
        b = _linspace32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
    else:  # squaredcos_cap_v2: Nichol & Dhariwal's cosine schedule, betas capped at 0.999
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        b = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                     dtype=np.float32)
    if cfg.get("rescale_betas_zero_snr"):
        b = _rescale_zero_terminal_snr(b)
    return b


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace rounded exactly like torch's CPU kernel (fused multiply-add from
    both ends), so the noise schedule is bit-identical to the one diffusers computes."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)
    return np.where(i < n // 2, np.float64(a) + step * i,
                    np.float64(b) - step * (n - 1 - i)).astype(np.float32)


def _rescale_zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: shift the schedule so the last step has zero SNR."""
    a_bar_sqrt = np.sqrt(np.cumprod((1.0 - b).astype(np.float64)).astype(np.float32))
    first, last = a_bar_sqrt[0].copy(), a_bar_sqrt[-1].copy()
    a_bar_sqrt = (a_bar_sqrt - last) * first / (first - last)
    a_bar = a_bar_sqrt**2
    alphas = np.concatenate([a_bar[:1], a_bar[1:] / a_bar[:-1]])
    return (1 - alphas).astype(np.float32)


def alphas_cumprod(cfg: Mapping[str, Any]) -> np.ndarray:
    # torch accumulates a float32 cumprod in float64; do the same for identical values
    return np.cumprod((1.0 - betas(cfg)).astype(np.float64)).astype(np.float32)


def sigmas_of(acp: np.ndarray) -> np.ndarray:
    """Karras sigma of every training timestep: sqrt((1 - a_bar) / a_bar)."""
    return (((1 - acp) / acp) ** 0.5).astype(np.float32)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. (5)."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by interpolating log-sigma."""
    sigma = np.asarray(sigma, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def leading_or_trailing(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """Descending timesteps for 'leading' / 'trailing' spacing (float, not yet cast)."""
    T = int(cfg["num_train_timesteps"])
    if cfg["timestep_spacing"] == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy() + cfg["steps_offset"]
    ratio = T / n
    return np.round(np.arange(T, 0, -ratio)) - 1


def discrete_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """Descending integer timesteps of DDIM-style schedulers for each spacing."""
    if cfg["timestep_spacing"] == "linspace":
        T = int(cfg["num_train_timesteps"])
        ts = np.linspace(0, T - 1, n).round()[::-1]
    else:
        ts = leading_or_trailing(cfg, n)
    return ts.astype(np.int64)


def threshold_sample(x0: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Saharia et al. 2022 dynamic thresholding of the predicted x0, per batch item."""
    b = x0.shape[0]
    flat = x0.reshape(b, -1)
    s = np.quantile(np.abs(flat), ratio, axis=1)
    s = np.clip(s, 1, max_value)[:, None]
    return (np.clip(flat, -s, s) / s).reshape(x0.shape).astype(x0.dtype)


def x0_and_eps(prediction_type: str, sample: np.ndarray, out: np.ndarray, alpha: float,
               sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Predicted clean sample and noise from the model output, where the sample is
    alpha * x0 + sigma * eps (alpha = sqrt(alpha_bar_t), sigma = sqrt(1 - alpha_bar_t))."""
    if prediction_type == "epsilon":
        return (sample - sigma * out) / alpha, out
    if prediction_type == "sample":
        return out, (sample - alpha * out) / sigma
    return alpha * sample - sigma * out, alpha * out + sigma * sample


def clamp_x0(cfg: Mapping[str, Any], x0: np.ndarray) -> np.ndarray:
    """The config's dynamic thresholding (Saharia et al. 2022) or plain clipping of x0."""
    if cfg.get("thresholding"):
        return threshold_sample(x0, cfg["dynamic_thresholding_ratio"], cfg["sample_max_value"])
    if cfg.get("clip_sample"):
        return np.clip(x0, -cfg["clip_sample_range"], cfg["clip_sample_range"])
    return x0
