"""LCM (Luo et al. 2023): consistency-distilled models' multistep sampler."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import Scheduler, clamp_x0, x0_and_eps


class LCMScheduler(Scheduler):
    class_name = "LCMScheduler"
    stochastic = True
    defaults = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", trained_betas=None, original_inference_steps=50,
                    clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True,
                    steps_offset=0, prediction_type="epsilon", thresholding=False,
                    dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
                    timestep_spacing="leading", timestep_scaling=10.0,
                    rescale_betas_zero_snr=False)

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        cfg, n = self.config, num_inference_steps
        T, orig = int(cfg["num_train_timesteps"]), int(cfg["original_inference_steps"])
        self._check_steps_limit(orig, "the LCM distillation schedule (original_inference_steps)")
        origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
        idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        self.timesteps = origin[idx].astype(np.int64)

    def _step(self, i: int, sample: np.ndarray, model_output: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        cfg = self.config
        t = int(self.timesteps[i])
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        # boundary-condition scalings c_skip, c_out with sigma_data = 0.5
        st = t * cfg["timestep_scaling"]
        c_skip = 0.25 / (st**2 + 0.25)
        c_out = st / (st**2 + 0.25) ** 0.5
        x0, _ = x0_and_eps(cfg["prediction_type"], sample, model_output, a_t**0.5,
                           (1 - a_t) ** 0.5)
        x0 = clamp_x0(cfg, x0)
        denoised = c_out * x0 + c_skip * sample
        if i == len(self.timesteps) - 1:
            return denoised
        assert noise is not None
        return a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * noise.astype(np.float32, copy=False)
