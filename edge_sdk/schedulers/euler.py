"""Euler (Karras et al. 2022, Algorithm 2 with no churn) over the model's sigma schedule."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import Scheduler, karras_sigmas, leading_or_trailing, sigma_to_t, sigmas_of


def euler_timesteps(cfg: Mapping[str, Any], n: int) -> np.ndarray:
    """Descending float32 timesteps with diffusers' Euler rounding for each spacing."""
    T = int(cfg["num_train_timesteps"])
    if cfg["timestep_spacing"] == "linspace":
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    return leading_or_trailing(cfg, n).astype(np.float32)


class SigmaScheduler(Scheduler):
    """Base of the k-diffusion style schedulers: x = x0 + sigma * eps, input scaled."""

    def _zero_snr_fix(self) -> None:
        if self.config.get("rescale_betas_zero_snr"):
            # a sigma of infinity at the last training step: diffusers uses 2**-24 instead
            self.alphas_cumprod[-1] = 2.0**-24

    def _set_init_noise_sigma(self) -> None:
        s_max = float(self.sigmas.max())
        linear = self.config["timestep_spacing"] in ("linspace", "trailing")
        self.init_noise_sigma = s_max if linear else (s_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: np.ndarray, i: int) -> np.ndarray:
        sigma = self.sigmas[i]  # float32 scalar: the same rounding as diffusers' tensors
        return (sample / (sigma**2 + 1) ** 0.5).astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        """x = x0 + sigma_i * noise (the variance-exploding form these schedulers use)."""
        return (original + noise * self.sigmas[i]).astype(np.float32)

    def _x0(self, sample: np.ndarray, out: np.ndarray, sigma: np.float32,
            sigma_hat: np.float32) -> np.ndarray:
        pt = self.config["prediction_type"]
        if pt == "epsilon":
            return sample - sigma_hat * out
        if pt == "v_prediction":
            return out * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return out


class EulerDiscreteScheduler(SigmaScheduler):
    class_name = "EulerDiscreteScheduler"
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                    beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                    interpolation_type="linear", use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None,
                    sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                    steps_offset=0, rescale_betas_zero_snr=False, final_sigmas_type="zero")
    supported = {"interpolation_type": ("linear", "log_linear"),
                 "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
                 "timestep_type": ("discrete",), "final_sigmas_type": ("zero", "sigma_min")}

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        self._zero_snr_fix()
        cfg, n = self.config, num_inference_steps
        ts = euler_timesteps(cfg, n)
        train_sigmas = np.array(sigmas_of(self.alphas_cumprod))
        log_sigmas = np.log(train_sigmas)
        if cfg["interpolation_type"] == "linear":
            sig = np.interp(ts, np.arange(0, len(train_sigmas)), train_sigmas)
        else:
            sig = np.exp(np.linspace(np.log(train_sigmas[-1]), np.log(train_sigmas[0]), n + 1,
                                     dtype=np.float32))
        if cfg["use_karras_sigmas"]:
            lo = cfg["sigma_min"] if cfg["sigma_min"] is not None else float(sig[-1])
            hi = cfg["sigma_max"] if cfg["sigma_max"] is not None else float(sig[0])
            sig = karras_sigmas(lo, hi, n)
            ts = sigma_to_t(sig, log_sigmas)
        if cfg["final_sigmas_type"] == "sigma_min":
            last = float(train_sigmas[0])
        else:
            last = 0.0
        self.sigmas = np.concatenate([sig, [last]]).astype(np.float32)
        self.timesteps = np.asarray(ts, dtype=np.float32)
        self._set_init_noise_sigma()

    def _step(self, i: int, sample: np.ndarray, model_output: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        sigma = self.sigmas[i]
        x0 = self._x0(sample, model_output, sigma, sigma)
        derivative = (sample - x0) / sigma  # (Karras 2022, eq. 7 with s(t) = 1)
        return sample + derivative * (self.sigmas[i + 1] - sigma)
