"""The one door: `Pipeline.load(bundle)` then `pipe(prompt, ...)`.

The stages stay public for callers who need them: `encode_prompt`, `denoise`,
`decode_latents`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from . import names as N
from .backends import BackendOptions, Session
from .components import Components
from .config import MAX_IMAGES, GenerationConfig, uses_guidance
from .denoise import (STEP_END_TENSORS, Conditioning, StepCallback, StepEndCallback, batch_noise,
                      check_step_end, run_denoising, step_end_callback, unet_predictor)
from .errors import InvalidInputError
from .image import to_pil
from .manifest import Manifest
from .estimate import check_fits
from .memory import MODES, MemoryPlan, plan_memory
from .models import default_bundle
from .osmem import return_freed_memory
from .schedulers import Scheduler, create_scheduler
from .text_encoder import PromptEmbeds, encode_prompts
from .spill import SpillMaps, check_spill_folder
from .tokenizer import PromptTokenizer, check_prompt
from .vae import decode_latents as _decode_whole
from .vae import decode_latents_tiled

log = logging.getLogger(__name__)

__all__ = ["Pipeline", "Generation"]


@dataclass
class Generation:
    """The full result of one generation."""

    images: list[Image.Image]
    latents: np.ndarray  # final latents, [images, C, h, w]
    config: GenerationConfig  # resolved: every field concrete
    prompt: str | list[str]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seeds: list[int] = field(default_factory=list)  # image k's own seed (config.seed + k)

    @property
    def parameters(self) -> dict[str, Any]:
        """What produced the (first) image (written into its file's metadata)."""
        return self.image_parameters(0)

    def image_parameters(self, k: int) -> dict[str, Any]:
        """What produced image k: generating its prompt with its seed and num_images 1 makes
        it again."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        seed = self.seeds[k] if self.seeds else self.config.seed
        return {**self.config.as_dict(), "prompt": prompts[k // int(self.config.num_images)],
                "seed": seed, "num_images": 1}


class Pipeline:
    """A loaded text-to-image bundle."""

    def __init__(self, bundle: Path, manifest: Manifest, options: BackendOptions,
                 plan: MemoryPlan | None = None, memory: str = "fast") -> None:
        self.bundle = bundle
        self.manifest = manifest
        self.options = options
        self.memory = memory  # a mode, or a budget planned for each generation's size
        self.plan = plan or MemoryPlan("fast", False, False, True)
        self.components = Components(bundle, manifest, options, self.plan)
        self._warned_untiled = False
        self._interrupt = False  # diffusers' flag: a step-end callback sets it to stop
        self.tokenizer = PromptTokenizer(bundle / manifest.tokenizer.file, manifest.tokenizer)

    @classmethod
    def load(cls, bundle: str | Path | None = None, *, backend: str = "auto",
             threads: int | None = None, providers: Sequence[str] | None = None,
             verify: bool = True, memory: str = "fast", delegate: str | None = None,
             delegate_options: Mapping[str, str] | None = None) -> "Pipeline":
        """Open a bundle folder (None = the default model).

        `backend`: "auto" (each component's own format), "onnx" or "tflite". `providers`:
        ONNX Runtime execution providers in order (e.g. ["xnnpack"], ["qnn"]); `delegate`:
        a TFLite external delegate library (.so) with its `delegate_options`. What is asked
        for and missing is an error naming what to install, not a silent fallback.
        `verify=True` checks every file's sha256 against the manifest before loading (turn it
        off on slow storage; sizes are still checked). `memory` is "fast", "balanced", "low"
        or a budget such as "300MB" (see edge_sdk.memory.MemoryPlan); the plan is logged.
        """
        path = Path(bundle) if bundle is not None else default_bundle()
        manifest = Manifest.load(path)
        manifest.verify_files(path, checksums=verify)
        options = BackendOptions.checked(backend, threads, providers, False, delegate,
                                         delegate_options)
        _check_accelerator_options(manifest, options.providers, options.delegate)
        # a budget is planned for the model's own default generation now, and again for
        # each generation's size (a larger one may need a lower mode)
        plan = plan_memory(memory, manifest, GenerationConfig(seed=0).resolve(manifest))
        if plan.return_freed and not return_freed_memory():
            log.info("could not set the C heap to return freed memory (not glibc)")
        pipe = cls(path, manifest, replace(options, low_memory=plan.map_weights), plan, memory)
        pipe.components.open_all(N.REQUIRED_COMPONENTS)
        log.info("loaded %s (%s, %s) from %s; %s", manifest.source.name, manifest.family,
                 manifest.variant, path, plan.describe())
        return pipe

    def session(self, component: str) -> Session:
        """The loaded session of a component (loaded on first use)."""
        return self.components.session(component)

    # -- stages --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | None = None,
                      num_images: int = 1, guidance_scale: float | None = None) -> PromptEmbeds:
        """Text embeddings for `prompt` (a list: each, in turn) and the negative prompt when
        guidance is on, repeated for `num_images` per prompt."""
        g = self.manifest.defaults.guidance_scale if guidance_scale is None else guidance_scale
        return encode_prompts(self.session(N.TEXT_ENCODER), self.tokenizer, _prompts(prompt),
                              negative_prompt, num_images, guidance=uses_guidance(g))

    def scheduler(self, cfg: GenerationConfig) -> Scheduler:
        """The scheduler a resolved config asks for, with the model's prediction type (a
        property of the weights, so the manifest's wins over any scheduler's default)."""
        return create_scheduler(cfg.scheduler, {**self.manifest.scheduler,
                                                "prediction_type": self.manifest.prediction_type},
                                int(cfg.steps or 0))

    def denoise(self, embeds: PromptEmbeds, latents: np.ndarray, *, steps: int | None = None,
                guidance_scale: float | None = None, scheduler: str | None = None,
                seed: int | None = None, callback: StepCallback | None = None
                ) -> np.ndarray:
        """Denoise initial noise `latents` ([B, C, h, w], unit variance; scaled here by the
        scheduler's init_noise_sigma) into final latents."""
        cfg = GenerationConfig(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                               seed=seed).resolve(self.manifest)
        if cfg.guidance and embeds.uncond is None:
            raise InvalidInputError(f"guidance_scale={cfg.guidance_scale} needs unconditional "
                                    "embeddings, but these were encoded with guidance off; "
                                    "encode_prompt(..., guidance_scale=...) with the same "
                                    "value")
        return self._denoise(Conditioning.from_prompt(embeds), latents, cfg,
                             np.random.default_rng(cfg.seed), callback)

    def decode_latents(self, latents: np.ndarray, tile: int | None = None) -> np.ndarray:
        """Final latents -> float images [B, H, W, 3] in [0, 1]. With `tile` (latent pixels;
        default: the memory plan's) and a bundle holding the decoder's stages, decoded exactly
        in tiles (edge_sdk.tiling): the same image in a fraction of the memory."""
        tile = (self.plan.vae_tile or 0) if tile is None else tile
        _check_decodable(latents, tile, self.manifest.vae.latent_channels)
        if tile and self.manifest.vae.decoder_stages:
            alloc = SpillMaps(self.plan.spill_dir) if self.plan.spill_maps else np.empty
            return decode_latents_tiled(self.components, latents, self.manifest.vae, tile,
                                        alloc)
        if tile and not self._warned_untiled:
            self._warned_untiled = True
            log.warning("this bundle has no VAE decoder stages: decoding untiled (re-convert "
                        "without --no-vae-stages for tiled decoding)")
        return _decode_whole(self.session(N.VAE_DECODER), latents, self.manifest.vae)

    # -- the whole thing -----------------------------------------------------------------
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | None = None,
                 steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None,
                 width: int | None = None, height: int | None = None,
                 scheduler: str | None = None, num_images: int = 1, *,
                 latents: np.ndarray | None = None, callback: StepCallback | None = None,
                 output_type: str = "pil", return_dict: bool = False,
                 callback_on_step_end: StepEndCallback | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = STEP_END_TENSORS,
                 **aliases: Any) -> Any:
        """Generate an image (a list when there are several: `num_images > 1`, or a list of
        prompts): the short form. `return_dict=True` returns the whole result instead (a
        Generation, whose `.images` is always a list, as diffusers' output is), as
        `generate` does. `None` = the model's default.

        The parameters are edge_sdk.config.GenerationConfig's; its diffusers aliases
        (`num_inference_steps`, `num_images_per_prompt`) are accepted too. `output_type`, as
        in diffusers: "pil", "np" (float arrays [H, W, 3] in [0, 1]) or "latent" (the final
        latents, not decoded). `callback_on_step_end(pipe, step, timestep, {"latents": ...})`
        as in diffusers: the "latents" of the dict it returns replace the latents, and
        `pipe._interrupt = True` stops the generation (a CancelledError, where diffusers
        would decode the half-denoised latents)."""
        params = dict(negative_prompt=negative_prompt, steps=steps,
                      guidance_scale=guidance_scale, seed=seed, width=width, height=height,
                      scheduler=scheduler, num_images=num_images)
        given = {k: v for k, v in params.items() if v is not None or k == "num_images"}
        if num_images == 1 and not isinstance(num_images, bool):  # the default: an alias may
            del given["num_images"]                                # set it instead
        config = GenerationConfig.from_kwargs({**given, **aliases})
        result = self.generate(prompt, config, latents=latents, callback=callback,
                               output_type=output_type, callback_on_step_end=callback_on_step_end,
                               callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        if return_dict:
            return result
        return result.images if len(result.images) > 1 else result.images[0]

    def generate(self, prompt: str | Sequence[str], config: GenerationConfig | None = None, *,
                 latents: np.ndarray | None = None, callback: StepCallback | None = None,
                 output_type: str = "pil", callback_on_step_end: StepEndCallback | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = STEP_END_TENSORS
                 ) -> Generation:
        """Like calling the pipeline, but returns latents, parameters, seeds and stage
        timings. A list of prompts gives `num_images` images for each; image k has its own
        seed, `seed + k`, and its own generator for everything random, so any one image can
        be generated again alone."""
        prompts, cfg, whole, plan = self._prepare(prompt, config, latents)
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise InvalidInputError(f"output_type {output_type!r} is not one of {OUTPUT_TYPES}")
        step_end = None
        if callback_on_step_end is not None:
            check_step_end(callback_on_step_end, callback_on_step_end_tensor_inputs)
            if callback is not None:
                raise InvalidInputError("give callback or callback_on_step_end, not both")
            step_end = (callback_on_step_end, callback_on_step_end_tensor_inputs)
        if callback is not None and not callable(callback):
            raise InvalidInputError(f"callback must be callable, got {callback!r}")
        self._interrupt = False
        self._use(plan)
        total = int(whole.num_images)
        seeds = [int(cfg.seed or 0) + k for k in range(total)]
        rng = [np.random.default_rng(s) for s in seeds]
        timings: dict[str, float] = {}
        with _timed(timings, "text_encoder"):
            embeds = self.encode_prompt(prompts, cfg.negative_prompt, int(cfg.num_images),
                                        cfg.guidance_scale)
            self.components.done_with(N.TEXT_ENCODER)
        noise = self._initial_noise(total, cfg, latents, rng)
        with _timed(timings, "denoise"):
            try:
                final = self._denoise(Conditioning.from_prompt(embeds), noise, cfg, rng,
                                      callback, step_end)
            finally:
                self.components.done_with(N.UNET)
        with _timed(timings, "vae_decoder"):
            images: list[Any] = list(final) if output_type == "latent" else \
                _as(output_type, self.decode_latents(final))
            self.components.done_with(N.VAE_DECODER)
        return Generation(images, final, cfg, prompt if isinstance(prompt, str) else prompts,
                          timings, seeds)

    @property
    def interrupt(self) -> bool:
        """Whether a callback_on_step_end asked the running generation to stop."""
        return self._interrupt

    def check(self, prompt: str | Sequence[str], config: GenerationConfig | None = None, *,
              latents: np.ndarray | None = None) -> GenerationConfig:
        """Everything `generate` checks before it starts, without starting: the prompts, the
        parameters, the number of images, and that the generation fits the memory budget and
        the memory available (a container's limit included). Returns the resolved config
        (the seed drawn, if none was given); raises the InvalidInputError `generate` would.
        A service calls it before queueing a request."""
        return self._prepare(prompt, config, latents)[1]

    def _prepare(self, prompt: str | Sequence[str], config: GenerationConfig | None,
                 latents: np.ndarray | None
                 ) -> tuple[list[str], GenerationConfig, GenerationConfig, MemoryPlan]:
        """The checked prompts, the resolved config, the config of the whole call (all its
        images) and the memory plan for it."""
        prompts = _prompts(prompt)
        if config is not None and not isinstance(config, GenerationConfig):
            raise InvalidInputError(f"config must be a GenerationConfig, got "
                                    f"{type(config).__name__}; or call the pipeline with "
                                    "keyword arguments")
        cfg = _size_from_latents(config or GenerationConfig(), latents,
                                 self.manifest.vae.scale_factor).resolve(self.manifest)
        total = len(prompts) * int(cfg.num_images)
        if total > MAX_IMAGES:
            raise InvalidInputError(f"{len(prompts)} prompts x {cfg.num_images} images is "
                                    f"{total}; at most {MAX_IMAGES} images per call")
        whole = replace(cfg, num_images=total)
        plan = self.plan if self.memory in MODES else \
            plan_memory(self.memory, self.manifest, whole)
        check_fits(self.manifest, whole, plan.mode)  # refuse now, not the OOM killer later
        if plan.spill_maps and plan.vae_tile and self.manifest.vae.decoder_stages:
            check_spill_folder(plan.spill_dir)
        return prompts, cfg, whole, plan

    def _use(self, plan: MemoryPlan) -> None:
        """Switch to another memory plan (its sessions are opened anew when needed)."""
        if plan.mode == self.plan.mode:
            return
        log.info("memory budget %s: %s for this generation", self.memory, plan.describe())
        if plan.return_freed:
            return_freed_memory()
        self.plan, self.options = plan, replace(self.options, low_memory=plan.map_weights)
        self.components = self.components.replan(self.options, plan)

    def _initial_noise(self, total: int, cfg: GenerationConfig, latents: np.ndarray | None,
                       rng: list[np.random.Generator]) -> np.ndarray:
        f, c = self.manifest.vae.scale_factor, self.manifest.vae.latent_channels
        shape = (total, c, int(cfg.height or 0) // f, int(cfg.width or 0) // f)
        if latents is None:
            return batch_noise(rng, shape)
        arr = np.asarray(latents)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.shape != shape:
            raise InvalidInputError(f"latents must have shape {shape} for {total} "
                                    f"image(s) of {cfg.width}x{cfg.height}, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise InvalidInputError("latents must be finite floating-point values")
        return arr.astype(np.float32)

    def _denoise(self, conditioning: Conditioning, noise: np.ndarray, cfg: GenerationConfig,
                 rng: np.random.Generator | list[np.random.Generator],
                 callback: StepCallback | None,
                 step_end: tuple[StepEndCallback, Sequence[str]] | None = None) -> np.ndarray:
        sched = self.scheduler(cfg)
        if step_end is not None:
            callback = step_end_callback(step_end[0], self, sched, step_end[1])
        latents = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        if conditioning.batch != latents.shape[0]:
            raise InvalidInputError(f"{conditioning.batch} prompt embeddings for "
                                    f"{latents.shape[0]} latents")
        predict = unet_predictor(self.session(N.UNET), conditioning, float(cfg.guidance_scale),
                                 batched=self.plan.batch_cfg)
        return run_denoising(predict, sched, latents, rng, callback)


class _timed:
    """Context manager adding the block's wall time to timings[key]."""

    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.key] = time.perf_counter() - self.t0


def _size_from_latents(config: GenerationConfig, latents: np.ndarray | None,
                       factor: int) -> GenerationConfig:
    """Given latents and no size, the image size is the latents' (times the VAE factor)."""
    if latents is None or config.width is not None or config.height is not None:
        return config
    arr = np.asarray(latents)
    if arr.ndim != 4:
        return config
    return replace(config, width=arr.shape[3] * factor, height=arr.shape[2] * factor)


OUTPUT_TYPES = ("pil", "np", "latent")


def _as(output_type: str, pixels: np.ndarray) -> list[Any]:
    """Decoded float images [B, H, W, 3] as PIL images or as arrays."""
    return to_pil(pixels) if output_type == "pil" else list(pixels)


def _check_decodable(latents: Any, tile: Any, channels: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 0:
        raise InvalidInputError(f"tile must be a whole number of latent pixels (0: untiled), "
                                f"got {tile!r}")
    shape = getattr(latents, "shape", None)
    if shape is None or len(shape) != 4 or shape[1] != channels or min(shape) < 1:
        raise InvalidInputError(f"latents to decode must be an array [batch, {channels}, "
                                f"height, width] with every side >= 1, got shape {shape}")


def _prompts(prompt: str | Sequence[str]) -> list[str]:
    """One prompt or a non-empty list of them, each checked."""
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise InvalidInputError("the list of prompts is empty")
        return [check_prompt(p, f"prompt {k}") for k, p in enumerate(prompt)]
    return [check_prompt(prompt)]


def _check_accelerator_options(manifest: Manifest, providers: Sequence[str] | None,
                               delegate: str | None) -> None:
    """An accelerator option that cannot apply to this bundle is an error, not ignored: the
    caller expects the NPU to run."""
    formats = {c.format for c in manifest.components.values()}
    if delegate and "tflite" not in formats:
        raise InvalidInputError("a TFLite delegate was given but this bundle holds no TFLite "
                                "component; use ONNX Runtime execution providers (providers= "
                                "/ --providers) or convert with `edge-convert --format tflite`")
    if providers and "onnx" not in formats:
        raise InvalidInputError("ONNX Runtime execution providers were given but this bundle "
                                "is TFLite; use a delegate (delegate= / --delegate PATH.so)")
