"""The denoising stage: a loop over a scheduler's steps around a predictor.

The loop knows nothing about the UNet's inputs: it calls `predict(latents, t, step)` and
hands the output to the scheduler. A predictor is built from a session and a Conditioning
(`unet_predictor`), so a new kind of UNet input (SDXL's added conditions, an inpainting
UNet's mask channels, ControlNet residuals, cached features) is a new predictor or a new
conditioning feed, not an edit of the loop. Classifier-free guidance lives here, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .backends import Session
from .contracts import UnetIO
from .errors import CallbackError, CancelledError, InferenceError, InvalidInputError
from .names import UNET, UNET_SHALLOW
from .schedulers import Scheduler
from .text_encoder import PromptEmbeds

log = logging.getLogger(__name__)

# predict(model_input, timestep, step_index) -> the model output (guided)
Predict = Callable[[np.ndarray, float, int], np.ndarray]
# callback(step, total_steps, latents) -> False to cancel, an array of the latents' shape to
# replace them, None/True to go on (step counts from 0 per run)
StepCallback = Callable[[int, int, np.ndarray], "bool | np.ndarray | None"]
# diffusers' callback_on_step_end(pipe, step, timestep, {"latents": ...}) -> a dict whose
# "latents", if there, replace the latents
StepEndCallback = Callable[[Any, int, float, dict], "Mapping[str, np.ndarray] | None"]
STEP_END_TENSORS = ("latents",)  # what callback_on_step_end_tensor_inputs may name
Feeds = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Conditioning:
    """The UNet's inputs besides sample and timestep, by contract name, for the conditional
    branch and (when classifier-free guidance is on) the unconditional one; each array has
    the latents' batch size. `channels` [B, k, h, w] are appended to the sample's channels
    in both branches (an inpainting UNet's mask and masked-image latents)."""

    cond: Feeds
    uncond: Feeds | None = None
    channels: np.ndarray | None = None

    @classmethod
    def from_prompt(cls, embeds: PromptEmbeds,
                    time_ids: Sequence[float] | None = None) -> "Conditioning":
        """The text conditioning; with `time_ids` (SDXL's six micro-conditioning numbers),
        the added conditions too: the pooled embeddings and the time ids for every item."""
        def feeds(context: np.ndarray, pooled: np.ndarray | None) -> dict[str, np.ndarray]:
            out = {UnetIO.CONTEXT: context}
            if time_ids is not None:
                if pooled is None:
                    raise InvalidInputError("this UNet takes pooled text embeddings (SDXL): "
                                            "encode the prompt with this pipeline's "
                                            "encode_prompt")
                out[UnetIO.TEXT_EMBEDS] = pooled
                out[UnetIO.TIME_IDS] = np.tile(np.asarray(time_ids, np.float32),
                                               (context.shape[0], 1))
            return out
        uncond = None if embeds.uncond is None else feeds(embeds.uncond, embeds.uncond_pooled)
        return cls(feeds(embeds.cond, embeds.pooled), uncond)

    @property
    def batch(self) -> int:
        return next(iter(self.cond.values())).shape[0]


def classifier_free_guidance(run: Callable[[np.ndarray, Feeds], np.ndarray], x: np.ndarray,
                             conditioning: Conditioning, guidance_scale: float,
                             batched: bool = True) -> np.ndarray:
    """uncond + g * (cond - uncond) (Ho & Salimans 2022), or the conditional output alone
    when the conditioning has no unconditional branch. `batched=False` runs the two branches
    as two calls: half the activation memory, the same result."""
    cond, uncond = conditioning.cond, conditioning.uncond
    if uncond is None:
        return run(x, cond)
    if batched:
        both = {k: np.concatenate([uncond[k], cond[k]]) for k in cond}
        out_uncond, out_cond = np.split(run(np.concatenate([x, x]), both), 2)
    else:
        out_uncond, out_cond = run(x, uncond), run(x, cond)
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def unet_feeds(sample: np.ndarray, t: float, feeds: Feeds,
               extra: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A UNet call's inputs by contract name: the sample (with `extra` channels appended,
    repeated for each guidance branch), the timestep for each item, the conditioning."""
    ts = np.full((sample.shape[0],), t, dtype=np.float32)
    if extra is not None:  # the same channels for each guidance branch
        reps = sample.shape[0] // extra.shape[0]
        sample = np.concatenate([sample, np.concatenate([extra] * reps)], axis=1)
    return {UnetIO.SAMPLE: sample, UnetIO.TIMESTEP: ts, **feeds}


def unet_predictor(unet: Session, conditioning: Conditioning, guidance_scale: float,
                   batched: bool = True) -> Predict:
    """The guided model output of a UNet session fed by the contract's names."""
    def predict(x: np.ndarray, t: float, step: int) -> np.ndarray:
        def run(sample: np.ndarray, feeds: Feeds) -> np.ndarray:
            return unet.run(unet_feeds(sample, t, feeds, conditioning.channels)
                            )[UnetIO.OUTPUT]
        return classifier_free_guidance(run, x, conditioning, guidance_scale, batched)
    return predict


def generation_predictor(session: Callable[[str], Session], time_cond_proj_dim: int,
                         conditioning: Conditioning, guidance_scale: float,
                         cache_interval: int = 1, batched: bool = True) -> Predict:
    """The predictor a generation asks for, from the sessions by role: an LCM-distilled
    UNet (`time_cond_proj_dim` > 0) gets the scale as an embedding in its one conditional
    pass; `cache_interval` > 1 alternates the whole UNet with its shallow branch
    (edge_sdk.feature_cache)."""
    if time_cond_proj_dim:
        w = guidance_embedding(guidance_scale - 1, time_cond_proj_dim, conditioning.batch)
        conditioning = replace(conditioning, cond={**conditioning.cond,
                                                   UnetIO.TIMESTEP_COND: w})
    if cache_interval > 1:
        from .feature_cache import cached_unet_predictor  # it builds on this module
        return cached_unet_predictor(session(UNET), session(UNET_SHALLOW), conditioning,
                                     guidance_scale, cache_interval, batched)
    return unet_predictor(session(UNET), conditioning, guidance_scale, batched)


def guidance_embedding(w: float, dim: int, batch: int) -> np.ndarray:
    """An LCM-distilled UNet's `timestep_cond`: the sinusoidal embedding of w * 1000 (w =
    guidance_scale - 1), as diffusers' `get_guidance_scale_embedding`, [batch, dim]."""
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32)
                   * -np.float32(np.log(np.float32(10000.0)) / (half - 1)))
    angles = np.float32(w * 1000.0) * freqs[None, :]
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return np.repeat(emb.astype(np.float32), batch, axis=0)


def batch_noise(rngs: Sequence[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal noise for a batch, item k drawn from rngs[k] (one generator may
    serve every item: the same numbers as one draw of the whole shape)."""
    if len(rngs) == 1:
        return rngs[0].standard_normal(shape, dtype=np.float32)
    if len(rngs) != shape[0]:
        raise ValueError(f"{len(rngs)} generators for a batch of {shape[0]}")
    return np.stack([r.standard_normal(shape[1:], dtype=np.float32) for r in rngs])


def _call(callback: StepCallback, step: int, total: int, latents: np.ndarray) -> object:
    try:
        return callback(step, total, latents)
    except Exception as exc:  # the caller's code: say whose failure it was
        raise CallbackError(f"the step callback raised {type(exc).__name__}: {exc} (at step "
                            f"{step + 1}/{total}); the generation was stopped") from exc


def _replacement(new: np.ndarray, latents: np.ndarray) -> np.ndarray:
    if new.shape != latents.shape or not np.issubdtype(new.dtype, np.floating):
        raise CallbackError(f"the step callback returned latents of shape {new.shape} "
                            f"({new.dtype}); they must be floats of shape {latents.shape}")
    return new.astype(np.float32, copy=False)


def check_step_end(fn: object, tensor_inputs: object) -> None:
    """A callback_on_step_end and its tensor inputs, checked before any work."""
    if not callable(fn):
        raise InvalidInputError(f"callback_on_step_end must be callable, got {fn!r}")
    if isinstance(tensor_inputs, str) or not isinstance(tensor_inputs, (list, tuple)) \
            or not all(isinstance(t, str) and t in STEP_END_TENSORS for t in tensor_inputs):
        raise InvalidInputError(f"callback_on_step_end_tensor_inputs={tensor_inputs!r}: "
                                f"give a list of {list(STEP_END_TENSORS)}")


def checked_step_callback(callback: StepCallback | None, step_end: StepEndCallback | None,
                          tensor_inputs: Sequence[str]) -> Any:
    """A generation's per-step callback, checked before any work: `callback`, or (the
    scheduler not made yet) a (callback_on_step_end, tensor inputs) pair."""
    if step_end is not None:
        check_step_end(step_end, tensor_inputs)
        if callback is not None:
            raise InvalidInputError("give callback or callback_on_step_end, not both")
        return (step_end, tensor_inputs)
    if callback is not None and not callable(callback):
        raise InvalidInputError(f"callback must be callable, got {callback!r}")
    return callback


def step_end_callback(fn: StepEndCallback, pipe: Any, scheduler: Scheduler,
                      tensor_inputs: Sequence[str] = STEP_END_TENSORS) -> StepCallback:
    """diffusers' `callback_on_step_end` as a StepCallback: called with the pipeline, the
    step, its timestep and {"latents": ...}; the "latents" of the dict it returns replace
    the latents; setting `pipe._interrupt = True` stops the generation (CancelledError:
    diffusers would decode the half-denoised latents instead)."""
    check_step_end(fn, tensor_inputs)

    def callback(step: int, total: int, latents: np.ndarray) -> "bool | np.ndarray | None":
        i = scheduler.begin_index + step
        out = fn(pipe, step, float(scheduler.timesteps[i]), {"latents": latents})
        if getattr(pipe, "_interrupt", False):
            return False
        if out is not None and not isinstance(out, Mapping):
            raise TypeError(f"it returned a {type(out).__name__}, not the dict of tensors "
                            "it was given (diffusers' callback_kwargs) or None")
        new = out.get("latents") if out is not None else None
        return np.asarray(new) if new is not None else None
    return callback


def run_denoising(predict: Predict, scheduler: Scheduler, latents: np.ndarray,
                  rng: np.random.Generator | Sequence[np.random.Generator] | None = None,
                  callback: StepCallback | None = None,
                  after_step: Callable[[int, np.ndarray], np.ndarray] | None = None,
                  observe: StepCallback | None = None) -> np.ndarray:
    """Run the scheduler's steps from its begin index on `latents` (already at that step's
    noise level: scaled by init_noise_sigma, or add_noise'd) and return the final latents.
    A stochastic scheduler's noise comes from `rng`: one generator, or one per batch item
    (so any image of a batch can be made again alone). `after_step(i, latents)` rewrites
    the latents after each step, before the callback sees them (inpainting's blend);
    `observe(step, total, latents)` sees each step's final latents, after the callback's
    replacement (live previews), its errors not the callback's."""
    rngs = [rng] if isinstance(rng, np.random.Generator) else list(rng or [])
    first, end = scheduler.begin_index, len(scheduler.timesteps)
    for i in range(first, end):
        model_in = scheduler.scale_model_input(latents, i)
        out = predict(model_in, float(scheduler.timesteps[i]), i)
        noise = batch_noise(rngs, latents.shape) if scheduler.stochastic and rngs else None
        latents = scheduler.step(i, latents, out, noise=noise)
        if after_step is not None:
            latents = after_step(i, latents)
        said = None if callback is None else _call(callback, i - first, end - first, latents)
        if said is False:
            raise CancelledError(f"generation cancelled by the callback at step "
                                 f"{i - first + 1}/{end - first}")
        if isinstance(said, np.ndarray):
            latents = _replacement(said, latents)
        if observe is not None:
            observe(i - first, end - first, latents)
    if not np.isfinite(latents).all():
        raise InferenceError("the denoised latents contain NaN/inf (the image would be black); "
                             "try an fp32 UNet, fewer guidance or another scheduler")
    return latents
