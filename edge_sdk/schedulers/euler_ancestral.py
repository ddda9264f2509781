"""Euler ancestral: an Euler step to sigma_down, then fresh noise of size sigma_up."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import sigmas_of
from .euler import SigmaScheduler, euler_timesteps


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    class_name = "EulerAncestralDiscreteScheduler"
    stochastic = True
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                    beta_schedule="linear", trained_betas=None, prediction_type="epsilon",
                    timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False)
    supported = {"prediction_type": ("epsilon", "v_prediction")}

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        self._zero_snr_fix()
        ts = euler_timesteps(self.config, num_inference_steps)
        train = np.array(sigmas_of(self.alphas_cumprod))
        sig = np.interp(ts, np.arange(0, len(train)), train)
        self.sigmas = np.concatenate([sig, [0.0]]).astype(np.float32)
        self.timesteps = ts
        self._set_init_noise_sigma()

    def _step(self, i: int, sample: np.ndarray, model_output: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        assert noise is not None  # Scheduler.step supplies it (stochastic = True)
        s_from, s_to = self.sigmas[i], self.sigmas[i + 1]  # float32, as diffusers
        x0 = self._x0(sample, model_output, s_from, s_from)
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
        s_down = (s_to**2 - s_up**2) ** 0.5
        prev = sample + (sample - x0) / s_from * (s_down - s_from)
        return prev + noise.astype(np.float32, copy=False) * s_up
