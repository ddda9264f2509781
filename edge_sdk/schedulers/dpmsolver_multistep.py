"""DPM-Solver++ multistep (Lu et al. 2022), "DPM++ 2M" at solver_order=2, optionally with
Karras sigmas ("DPM++ 2M Karras")."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .base import (Scheduler, clamp_x0, karras_sigmas, sigma_to_t, sigmas_of,
                   x0_and_eps)


class DPMSolverMultistepScheduler(Scheduler):
    class_name = "DPMSolverMultistepScheduler"
    defaults = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                    beta_schedule="linear", trained_betas=None, solver_order=2,
                    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
                    sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint",
                    lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
                    use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False,
                    use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero",
                    lambda_min_clipped=-float("inf"), variance_type=None,
                    timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
                    use_dynamic_shifting=False, time_shift_type="exponential")
    supported = {"algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint", "heun"),
                 "solver_order": (1, 2, 3), "use_exponential_sigmas": (False,),
                 "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
                 "use_flow_sigmas": (False,), "variance_type": (None,),
                 "final_sigmas_type": ("zero", "sigma_min"), "use_dynamic_shifting": (False,)}

    def __init__(self, config: Mapping[str, Any], num_inference_steps: int) -> None:
        super().__init__(config, num_inference_steps)
        cfg, n = self.config, num_inference_steps
        if cfg["rescale_betas_zero_snr"]:
            self.alphas_cumprod[-1] = 2.0**-24
        acp = self.alphas_cumprod
        T = int(cfg["num_train_timesteps"])
        lambda_t = np.log(np.sqrt(acp)) - np.log(np.sqrt(1 - acp))
        clipped = int(np.searchsorted(lambda_t[::-1], cfg["lambda_min_clipped"]))
        last = T - clipped
        if cfg["timestep_spacing"] == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        elif cfg["timestep_spacing"] == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1] + cfg["steps_offset"]
        else:
            ts = np.arange(last, 0, -T / n).round() - 1
        ts = ts.astype(np.int64)
        train = np.array(sigmas_of(acp))
        log_sigmas = np.log(train)
        if cfg["use_karras_sigmas"]:
            flipped = train[::-1]
            sig = karras_sigmas(float(flipped[-1]), float(flipped[0]), n)
            ts = sigma_to_t(sig, log_sigmas)
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sig = np.interp(ts, np.arange(0, len(train)), train)
        final = float(train[0]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sig, [final]]).astype(np.float32)
        self.timesteps = np.asarray(ts).astype(np.int64)
        self._outputs: list[np.ndarray | None] = [None] * cfg["solver_order"]
        self._lower_order_nums = 0

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
        """alpha_t, sigma_t and lambda_t = log(alpha_t / sigma_t) of a Karras sigma, in
        float32 scalars like diffusers (lambda is +inf at sigma = 0)."""
        alpha = np.float32(1) / (sigma**2 + np.float32(1)) ** np.float32(0.5)
        s = sigma * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(s)
        return alpha, s, lam

    def add_noise(self, original: np.ndarray, noise: np.ndarray, i: int) -> np.ndarray:
        alpha, sigma, _ = self._alpha_sigma(self.sigmas[i])
        return (alpha * original + sigma * noise).astype(np.float32)

    def _to_x0(self, i: int, sample: np.ndarray, out: np.ndarray) -> np.ndarray:
        alpha, sigma, _ = self._alpha_sigma(self.sigmas[i])
        x0, _ = x0_and_eps(self.config["prediction_type"], sample, out, alpha, sigma)
        return clamp_x0(self.config, x0)

    def _step(self, i: int, sample: np.ndarray, model_output: np.ndarray,
              noise: np.ndarray | None) -> np.ndarray:
        cfg, n = self.config, len(self.timesteps)
        lower_final = i == n - 1 and (cfg["euler_at_final"] or (cfg["lower_order_final"] and n < 15)
                                      or cfg["final_sigmas_type"] == "zero")
        lower_second = i == n - 2 and cfg["lower_order_final"] and n < 15
        self._outputs = self._outputs[1:] + [self._to_x0(i, sample, model_output)]
        order = cfg["solver_order"]
        if order == 1 or self._lower_order_nums < 1 or lower_final:
            prev = self._first_order(i, sample)
        elif order == 2 or self._lower_order_nums < 2 or lower_second:
            prev = self._second_order(i, sample)
        else:
            prev = self._third_order(i, sample)
        self._lower_order_nums = min(self._lower_order_nums + 1, order)
        return prev

    def _first_order(self, i: int, sample: np.ndarray) -> np.ndarray:
        a_t, s_t, l_t = self._alpha_sigma(self.sigmas[i + 1])
        _, s_s, l_s = self._alpha_sigma(self.sigmas[i])
        h = l_t - l_s
        # DPM-Solver++(1), eq. (5) of Lu et al. 2022b (it is DDIM)
        return s_t / s_s * sample - a_t * (np.exp(-h) - np.float32(1.0)) * self._outputs[-1]

    def _second_order(self, i: int, sample: np.ndarray) -> np.ndarray:
        a_t, s_t, l_t = self._alpha_sigma(self.sigmas[i + 1])
        _, s_s0, l_s0 = self._alpha_sigma(self.sigmas[i])
        _, _, l_s1 = self._alpha_sigma(self.sigmas[i - 1])
        m0, m1 = self._outputs[-1], self._outputs[-2]
        h, h0 = l_t - l_s0, l_s0 - l_s1
        d0, d1 = m0, (1.0 / (h0 / h)) * (m0 - m1)  # operation order as diffusers
        e = np.exp(-h) - np.float32(1.0)
        if self.config["solver_type"] == "midpoint":
            return s_t / s_s0 * sample - a_t * e * d0 - 0.5 * (a_t * e) * d1
        return s_t / s_s0 * sample - a_t * e * d0 + a_t * (e / h + 1.0) * d1

    def _third_order(self, i: int, sample: np.ndarray) -> np.ndarray:
        a_t, s_t, l_t = self._alpha_sigma(self.sigmas[i + 1])
        _, s_s0, l_s0 = self._alpha_sigma(self.sigmas[i])
        _, _, l_s1 = self._alpha_sigma(self.sigmas[i - 1])
        _, _, l_s2 = self._alpha_sigma(self.sigmas[i - 2])
        m0, m1, m2 = self._outputs[-1], self._outputs[-2], self._outputs[-3]
        h, h0, h1 = l_t - l_s0, l_s0 - l_s1, l_s1 - l_s2
        r0, r1 = h0 / h, h1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        e = np.exp(-h) - np.float32(1.0)
        return (s_t / s_s0 * sample - a_t * e * m0 + a_t * (e / h + 1.0) * d1
                - a_t * ((e + h) / h**2 - 0.5) * d2)
