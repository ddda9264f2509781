"""PNDM / PLMS (Liu et al. 2022): Stable Diffusion 1.x's default scheduler.

With `skip_prk_steps=True` (what SD checkpoints set) it is the linear multistep PLMS method;
otherwise the first steps are Runge-Kutta (PRK) steps, as in diffusers.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import Scheduler, discrete_timesteps, x0_and_eps


class PNDMScheduler(Scheduler):
    class_name = "PNDMScheduler"
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                    beta_schedule="linear", trained_betas=None, skip_prk_steps=False,
                    set_alpha_to_one=False, prediction_type="epsilon", timestep_spacing="leading",
                    steps_offset=0)
    supported = {"prediction_type": ("epsilon", "v_prediction")}

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        cfg, n = self.config, num_inference_steps
        T = int(cfg["num_train_timesteps"])
        self._check_steps_limit(T, "num_train_timesteps")
        base = discrete_timesteps(cfg, n)[::-1]  # ascending
        self._stride = T // n
        if cfg["skip_prk_steps"]:
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        else:
            if n < 4:
                from ..errors import InvalidInputError
                raise InvalidInputError("PNDMScheduler with PRK steps needs steps >= 4")
            prk = np.array(base[-4:]).repeat(2) + np.tile(np.array([0, self._stride // 2]), 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].astype(np.int64)
            plms = base[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self._ets: list[np.ndarray] = []
        self._cur_sample: np.ndarray | None = None
        self._cur_out: np.ndarray | float = 0.0

    def _step(self, i: int, sample: np.ndarray, model_output: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        # PNDM's phases count calls from the first one run (diffusers' `counter`), while the
        # timestep is the i-th: they differ when the run starts at a begin index
        if i - self.begin_index < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            return self._step_prk(i, sample, model_output)
        return self._step_plms(i, sample, model_output)

    def _step_prk(self, step: int, sample: np.ndarray, out: np.ndarray) -> np.ndarray:
        t, i = int(self.timesteps[step]), step - self.begin_index
        prev = t - (0 if i % 2 else self._stride // 2)
        t = int(self.prk_timesteps[i // 4 * 4])
        # Runge-Kutta 4 weights 1/6, 1/3, 1/3, 1/6 over the four evaluations
        if i % 4 == 0:
            self._cur_out = self._cur_out + out / 6
            self._ets.append(out)
            self._cur_sample = sample
        elif i % 4 in (1, 2):
            self._cur_out = self._cur_out + out / 3
        else:
            out = self._cur_out + out / 6
            self._cur_out = 0.0
        cur = self._cur_sample if self._cur_sample is not None else sample
        return self._prev_sample(cur, t, prev, out)

    def _step_plms(self, step: int, sample: np.ndarray, out: np.ndarray) -> np.ndarray:
        t, i = int(self.timesteps[step]), step - self.begin_index
        prev = t - self._stride
        if i != 1:
            self._ets = self._ets[-3:] + [out]
        else:  # the second call re-evaluates the first timestep (a 2nd-order start)
            prev, t = t, t + self._stride
        e = self._ets
        if len(e) == 1 and i == 0:
            self._cur_sample = sample
        elif len(e) == 1 and i == 1:
            out = (out + e[-1]) / 2
            sample, self._cur_sample = self._cur_sample, None  # type: ignore[assignment]
        elif len(e) == 2:
            out = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            out = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            out = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24
        return self._prev_sample(sample, t, prev, out)

    def _prev_sample(self, sample: np.ndarray, t: int, prev: int, out: np.ndarray) -> np.ndarray:
        a_t = float(self.alphas_cumprod[t])
        a_prev = float(self.alphas_cumprod[prev]) if prev >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config["prediction_type"] == "v_prediction":
            out = x0_and_eps("v_prediction", sample, out, a_t**0.5, b_t**0.5)[1]
        # formula (9) of the PNDM paper
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return sample_coeff * sample - (a_prev - a_t) * out / denom
