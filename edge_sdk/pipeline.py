"""The one door: `Pipeline.load(bundle)` then `pipe(prompt, ...)`.

The stages stay public for callers who need them: `encode_prompt`, `denoise`,
`decode_latents`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from . import denoise as _denoise
from . import names as N
from .backends import BackendOptions, Session, open_session
from .config import GenerationConfig, ResolvedConfig
from .errors import BundleError, InvalidInputError
from .image import to_pil
from .manifest import Manifest
from .memory import (MemoryPlan, check_fits, drop_mapped_pages, estimate_peak_bytes,
                     plan_memory, return_freed_memory)
from .models import default_bundle
from .schedulers import create_scheduler
from .text_encoder import PromptEmbeds, encode_prompts
from .tiling import FileBackedMaps
from .tokenizer import PromptTokenizer
from .vae import decode_latents as _decode_latents
from .vae import decode_latents_tiled, decoder_stages

log = logging.getLogger(__name__)

__all__ = ["Pipeline", "Generation"]


@dataclass
class Generation:
    """The full result of one generation."""

    images: list[Image.Image]
    latents: np.ndarray  # final latents, [num_images, C, h, w]
    config: ResolvedConfig
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
        self._warned_untiled = False
        self.tokenizer = PromptTokenizer(bundle / manifest.tokenizer.file, manifest.tokenizer)
        self._sessions: dict[str, Session] = {}
        self._load_lock = threading.Lock()

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
        decoder_stages(manifest)  # a malformed stage list is refused now, not at decode time
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise InvalidInputError(f"threads must be a positive integer, got {threads!r}")
        _check_accelerator_options(manifest, providers, delegate)
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
        for comp in N.REQUIRED_COMPONENTS:  # load eagerly: errors surface at load time
            pipe.session(comp)
            pipe._done_with(comp)  # in low mode, loaded again when its stage comes
        log.info("loaded %s (%s, %s) from %s; %s", manifest.source.name, manifest.family,
                 manifest.variant, path, plan.describe())
        return pipe

    def session(self, component: str) -> Session:
        """The loaded session of a component (loaded on first use)."""
        with self._load_lock:
            if component not in self._sessions:
                spec = self.manifest.components.get(component)
                if spec is None:
                    raise BundleError(f"this bundle has no {component!r} component; "
                                      "re-convert it with that component")
                self._sessions[component] = open_session(self.bundle, spec, self.options)
            return self._sessions[component]

    def _done_with(self, component: str) -> None:
        """Release a component after its stage, or drop its mapped weights from the
        resident set, when the memory plan says so."""
        if self.plan.release_between_stages:
            with self._load_lock:
                self._sessions.pop(component, None)
        elif self.plan.drop_pages and component in self.manifest.components:
            spec = self.manifest.components[component]
            dropped = drop_mapped_pages(self.bundle / f.path for f in spec.files)
            log.debug("%s: %.1f MiB of mapped weights dropped", component, dropped / 2**20)

    # -- stages --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str, negative_prompt: str | None = None,
                      num_images: int = 1, guidance_scale: float | None = None) -> PromptEmbeds:
        """Text embeddings for `prompt` (and the negative prompt when guidance is on)."""
        if not isinstance(prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(prompt).__name__}")
        g = self.manifest.defaults.guidance_scale if guidance_scale is None else guidance_scale
        return encode_prompts(self.session(N.TEXT_ENCODER), self.tokenizer, prompt,
                              negative_prompt, num_images, guidance=g > 1.0)

    def denoise(self, embeds: PromptEmbeds, latents: np.ndarray, *, steps: int | None = None,
                guidance_scale: float | None = None, scheduler: str | None = None,
                seed: int | None = None, callback: _denoise.StepCallback | None = None
                ) -> np.ndarray:
        """Denoise initial noise `latents` ([B, C, h, w], unit variance; scaled here by the
        scheduler's init_noise_sigma) into final latents."""
        cfg = GenerationConfig(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                               seed=seed).resolve(self.manifest)
        return self._denoise(embeds, latents, cfg, np.random.default_rng(cfg.seed), callback)

    def decode_latents(self, latents: np.ndarray, tile: int | None = None) -> np.ndarray:
        """Final latents -> float images [B, H, W, 3] in [0, 1]. With `tile` (latent pixels;
        default: the memory plan's) and a bundle holding the decoder's stages, decoded exactly
        in tiles (edge_sdk.tiling): the same image in a fraction of the memory."""
        tile = self.plan.vae_tile if tile is None else tile
        stages = decoder_stages(self.manifest)
        if tile and stages:
            alloc = FileBackedMaps(self.plan.spill_dir) if self.plan.spill_maps else np.empty
            return decode_latents_tiled(self.session, self._done_with, stages, latents,
                                        self.manifest.vae, tile, alloc)
        if tile and not self._warned_untiled:
            self._warned_untiled = True
            log.warning("this bundle has no VAE decoder stages: decoding untiled (re-convert "
                        "with `edge-convert --vae-stages` for tiled decoding)")
        return _decode_latents(self.session(N.VAE_DECODER), latents, self.manifest.vae)

    # -- the whole thing -----------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None,
                 width: int | None = None, height: int | None = None,
                 scheduler: str | None = None, latents: np.ndarray | None = None,
                 callback: _denoise.StepCallback | None = None,
                 num_images: int = 1) -> Image.Image | list[Image.Image]:
        """Generate an image (a list when `num_images > 1`). `None` = the model's default."""
        result = self.generate(prompt, GenerationConfig(
            negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
            seed=seed, width=width, height=height, scheduler=scheduler, num_images=num_images),
            latents=latents, callback=callback)
        return result.images if num_images > 1 else result.images[0]

    def generate(self, prompt: str, config: GenerationConfig | None = None, *,
                 latents: np.ndarray | None = None,
                 callback: _denoise.StepCallback | None = None) -> Generation:
        """Like calling the pipeline, but returns latents, parameters and stage timings."""
        config = config or GenerationConfig()
        if latents is not None and config.width is None and config.height is None:
            latents = np.asarray(latents)
            f = self.manifest.vae.scale_factor
            if latents.ndim == 4:
                config = GenerationConfig(**{**config.__dict__, "width": latents.shape[3] * f,
                                             "height": latents.shape[2] * f})
        cfg = config.resolve(self.manifest)
        check_fits(self.manifest, cfg)  # refuse now what the OOM killer would end later
        rng = np.random.default_rng(cfg.seed)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        embeds = self.encode_prompt(prompt, cfg.negative_prompt, cfg.num_images,
                                    cfg.guidance_scale)
        self._done_with(N.TEXT_ENCODER)
        timings["text_encoder"] = time.perf_counter() - t0
        noise = self._initial_noise(cfg, latents, rng)
        t0 = time.perf_counter()
        try:
            final = self._denoise(embeds, noise, cfg, rng, callback)
        finally:
            self._done_with(N.UNET)
        timings["denoise"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        images = to_pil(self.decode_latents(final))
        self._done_with(N.VAE_DECODER)
        timings["vae_decoder"] = time.perf_counter() - t0
        return Generation(images, final, cfg, prompt, timings)

    def _initial_noise(self, cfg: ResolvedConfig, latents: np.ndarray | None,
                       rng: np.random.Generator) -> np.ndarray:
        f, c = self.manifest.vae.scale_factor, self.manifest.unet.in_channels
        shape = (cfg.num_images, c, cfg.height // f, cfg.width // f)
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

    def _denoise(self, embeds: PromptEmbeds, noise: np.ndarray, cfg: ResolvedConfig,
                 rng: np.random.Generator, callback: _denoise.StepCallback | None
                 ) -> np.ndarray:
        # the prediction type is a property of the model: the manifest's wins
        sched = create_scheduler(cfg.scheduler, {**self.manifest.scheduler,
                                                 "prediction_type": self.manifest.prediction_type},
                                 cfg.steps)
        latents = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        if embeds.cond.shape[0] != latents.shape[0]:
            raise InvalidInputError(f"{embeds.cond.shape[0]} prompt embeddings for "
                                    f"{latents.shape[0]} latents")
        return _denoise.denoise(self.session(N.UNET), sched, latents, embeds,
                                cfg.guidance_scale, rng, callback, batch_cfg=self.plan.batch_cfg)


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
