"""DDIM (Song et al. 2020), deterministic (eta = 0) as Stable Diffusion pipelines use it."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import Scheduler, clamp_x0, discrete_timesteps, x0_and_eps


class DDIMScheduler(Scheduler):
    class_name = "DDIMScheduler"
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                    beta_schedule="linear", trained_betas=None, clip_sample=True,
                    set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                    thresholding=False, dynamic_thresholding_ratio=0.995, clip_sample_range=1.0,
                    sample_max_value=1.0, timestep_spacing="leading", rescale_betas_zero_snr=False)

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        cfg, n = self.config, num_inference_steps
        T = int(cfg["num_train_timesteps"])
        self._check_steps_limit(T, "num_train_timesteps")
        self.timesteps = discrete_timesteps(cfg, n)
        # diffusers steps back by T // n whatever the spacing; we do the same to match it.
        self._stride = T // n

    def _step(self, i: int, sample: np.ndarray, model_output: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        t = int(self.timesteps[i])
        prev = t - self._stride
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        x0, eps = x0_and_eps(cfg["prediction_type"], sample, model_output, a_t**0.5,
                             (1 - a_t) ** 0.5)
        x0 = clamp_x0(cfg, x0)
        # (12) of the DDIM paper with sigma_t = 0
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
