"""The denoising loop: UNet + scheduler, with classifier-free guidance."""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from . import names as N
from .backends import Session
from .errors import CancelledError, InferenceError
from .schedulers import Scheduler
from .text_encoder import PromptEmbeds

log = logging.getLogger(__name__)

# callback(step_index, total_steps, latents) -> False to cancel
StepCallback = Callable[[int, int, np.ndarray], "bool | None"]


def predict_noise(unet: Session, x: np.ndarray, t: float, embeds: PromptEmbeds,
                  guidance_scale: float, batch_cfg: bool = True) -> np.ndarray:
    """The model output at timestep `t`, guided: uncond + g * (cond - uncond).

    `batch_cfg=False` runs the unconditional and conditional halves as two calls, which
    halves the UNet's activation memory for the same result.
    """
    def call(sample: np.ndarray, context: np.ndarray) -> np.ndarray:
        ts = np.full((sample.shape[0],), t, dtype=np.float32)
        return unet.run({N.UNET_SAMPLE: sample, N.UNET_TIMESTEP: ts,
                         N.UNET_CONTEXT: context})[N.UNET_OUTPUT]

    if embeds.uncond is None:
        return call(x, embeds.cond)
    if batch_cfg:
        out = call(np.concatenate([x, x]), np.concatenate([embeds.uncond, embeds.cond]))
        uncond, cond = np.split(out, 2)
    else:
        uncond, cond = call(x, embeds.uncond), call(x, embeds.cond)
    return uncond + guidance_scale * (cond - uncond)


def denoise(unet: Session, scheduler: Scheduler, latents: np.ndarray, embeds: PromptEmbeds,
            guidance_scale: float, rng: np.random.Generator | None = None,
            callback: StepCallback | None = None, batch_cfg: bool = True) -> np.ndarray:
    """Run every step of `scheduler` from `latents` (already scaled by init_noise_sigma)."""
    n = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(latents, i)
        noise_pred = predict_noise(unet, model_in, float(t), embeds, guidance_scale, batch_cfg)
        latents = scheduler.step(i, latents, noise_pred, rng=rng)
        if callback is not None and callback(i, n, latents) is False:
            raise CancelledError(f"generation cancelled by the callback at step {i + 1}/{n}")
    if not np.isfinite(latents).all():
        raise InferenceError("the denoised latents contain NaN/inf (the image would be black); "
                             "try an fp32 UNet, fewer guidance or another scheduler")
    return latents
