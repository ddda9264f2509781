"""The one door: `Pipeline.load(bundle)` then `pipe(prompt, ...)`.

The stages stay public for callers who need them: `encode_prompt`, `denoise`,
`decode_latents`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from . import names as N
from .backends import BackendOptions, Session
from .components import Components
from .config import GenerationConfig, uses_guidance
from .denoise import Conditioning, StepCallback, run_denoising, unet_predictor
from .errors import InvalidInputError
from .image import to_pil
from .manifest import Manifest
from .memory import MemoryPlan, check_fits, estimate_peak_bytes, plan_memory
from .models import default_bundle
from .osmem import return_freed_memory
from .schedulers import Scheduler, create_scheduler
from .text_encoder import PromptEmbeds, encode_prompts
from .tiling import FileBackedMaps
from .tokenizer import PromptTokenizer
from .vae import decode_latents as _decode_whole
from .vae import decode_latents_tiled

log = logging.getLogger(__name__)

__all__ = ["Pipeline", "Generation"]


@dataclass
class Generation:
    """The full result of one generation."""

    images: list[Image.Image]
    latents: np.ndarray  # final latents, [num_images, C, h, w]
    config: GenerationConfig  # resolved: every field concrete
    prompt: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def parameters(self) -> dict[str, Any]:
        """What produced the images (written into PNG metadata)."""
        return {"prompt": self.prompt, **self.config.as_dict()}


class Pipeline:
    """A loaded text-to-image bundle."""

    def __init__(self, bundle: Path, manifest: Manifest, options: BackendOptions,
                 plan: MemoryPlan | None = None) -> None:
        self.bundle = bundle
        self.manifest = manifest
        self.options = options
        self.plan = plan or MemoryPlan("fast", False, False, True)
        self.components = Components(bundle, manifest, options, self.plan)
        self._warned_untiled = False
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
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise InvalidInputError(f"threads must be a positive integer, got {threads!r}")
        _check_accelerator_options(manifest, providers, delegate)
        # planned for the model's own default generation (its size, steps and guidance)
        plan = plan_memory(memory, manifest, estimate_peak_bytes(
            manifest, GenerationConfig(seed=0).resolve(manifest)))
        if plan.return_freed and not return_freed_memory():
            log.info("could not set the C heap to return freed memory (not glibc)")
        options = BackendOptions(backend=backend, threads=threads,
                                 providers=tuple(providers) if providers else None,
                                 low_memory=plan.map_weights, delegate=delegate,
                                 delegate_options=tuple((str(k), str(v)) for k, v in
                                                        (delegate_options or {}).items()))
        pipe = cls(path, manifest, options, plan)
        pipe.components.open_all(N.REQUIRED_COMPONENTS)
        log.info("loaded %s (%s, %s) from %s; %s", manifest.source.name, manifest.family,
                 manifest.variant, path, plan.describe())
        return pipe

    def session(self, component: str) -> Session:
        """The loaded session of a component (loaded on first use)."""
        return self.components.session(component)

    # -- stages --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, negative_prompt: str | None = None,
                      num_images: int = 1, guidance_scale: float | None = None) -> PromptEmbeds:
        """Text embeddings for `prompt` (and the negative prompt when guidance is on)."""
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        g = self.manifest.defaults.guidance_scale if guidance_scale is None else guidance_scale
        return encode_prompts(self.session(N.TEXT_ENCODER), self.tokenizer, prompt,
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
        return self._denoise(Conditioning.from_prompt(embeds), latents, cfg,
                             np.random.default_rng(cfg.seed), callback)

    def decode_latents(self, latents: np.ndarray, tile: int | None = None) -> np.ndarray:
        """Final latents -> float images [B, H, W, 3] in [0, 1]. With `tile` (latent pixels;
        default: the memory plan's) and a bundle holding the decoder's stages, decoded exactly
        in tiles (edge_sdk.tiling): the same image in a fraction of the memory."""
        tile = self.plan.vae_tile if tile is None else tile
        if tile and self.manifest.vae.decoder_stages:
            alloc = FileBackedMaps(self.plan.spill_dir) if self.plan.spill_maps else np.empty
            return decode_latents_tiled(self.components, latents, self.manifest.vae, tile,
                                        alloc)
        if tile and not self._warned_untiled:
            self._warned_untiled = True
            log.warning("this bundle has no VAE decoder stages: decoding untiled (re-convert "
                        "with `edge-convert --vae-stages` for tiled decoding)")
        return _decode_whole(self.session(N.VAE_DECODER), latents, self.manifest.vae)

    # -- the whole thing -----------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None,
                 width: int | None = None, height: int | None = None,
                 scheduler: str | None = None, num_images: int = 1, *,
                 latents: np.ndarray | None = None, callback: StepCallback | None = None,
                 **aliases: Any) -> Image.Image | list[Image.Image]:
        """Generate an image (a list when `num_images > 1`). `None` = the model's default.
        The parameters are edge_sdk.config.GenerationConfig's; its diffusers aliases
        (`num_inference_steps`, `num_images_per_prompt`) are accepted too."""
        params = dict(negative_prompt=negative_prompt, steps=steps,
                      guidance_scale=guidance_scale, seed=seed, width=width, height=height,
                      scheduler=scheduler, num_images=num_images)
        given = {k: v for k, v in params.items() if v is not None}
        if num_images == 1:  # the default: an alias may set it
            del given["num_images"]
        config = GenerationConfig.from_kwargs({**given, **aliases})
        result = self.generate(prompt, config, latents=latents, callback=callback)
        return result.images if len(result.images) > 1 else result.images[0]

    def generate(self, prompt: str, config: GenerationConfig | None = None, *,
                 latents: np.ndarray | None = None,
                 callback: StepCallback | None = None) -> Generation:
        """Like calling the pipeline, but returns latents, parameters and stage timings."""
        cfg = _size_from_latents(config or GenerationConfig(), latents,
                                 self.manifest.vae.scale_factor).resolve(self.manifest)
        check_fits(self.manifest, cfg)  # refuse now what the OOM killer would end later
        rng = np.random.default_rng(cfg.seed)
        timings: dict[str, float] = {}
        with _timed(timings, "text_encoder"):
            embeds = self.encode_prompt(prompt, cfg.negative_prompt, cfg.num_images,
                                        cfg.guidance_scale)
            self.components.done_with(N.TEXT_ENCODER)
        noise = self._initial_noise(cfg, latents, rng)
        with _timed(timings, "denoise"):
            try:
                final = self._denoise(Conditioning.from_prompt(embeds), noise, cfg, rng,
                                      callback)
            finally:
                self.components.done_with(N.UNET)
        with _timed(timings, "vae_decoder"):
            images = to_pil(self.decode_latents(final))
            self.components.done_with(N.VAE_DECODER)
        return Generation(images, final, cfg, prompt, timings)

    def _initial_noise(self, cfg: GenerationConfig, latents: np.ndarray | None,
                       rng: np.random.Generator) -> np.ndarray:
        f, c = self.manifest.vae.scale_factor, self.manifest.vae.latent_channels
        shape = (int(cfg.num_images), c, int(cfg.height or 0) // f, int(cfg.width or 0) // f)
        if latents is None:
            return rng.standard_normal(shape, dtype=np.float32)
        arr = np.asarray(latents)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.shape != shape:
            raise InvalidInputError(f"latents must have shape {shape} for {cfg.num_images} "
                                    f"image(s) of {cfg.width}x{cfg.height}, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise InvalidInputError("latents must be finite floating-point values")
        return arr.astype(np.float32)

    def _denoise(self, conditioning: Conditioning, noise: np.ndarray, cfg: GenerationConfig,
                 rng: np.random.Generator, callback: StepCallback | None) -> np.ndarray:
        sched = self.scheduler(cfg)
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
    from dataclasses import replace
    return replace(config, width=arr.shape[3] * factor, height=arr.shape[2] * factor)


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
