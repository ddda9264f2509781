"""The one door: `Pipeline.load(bundle)` then `pipe(prompt, ...)`.

The stages stay public for callers who need them: `encode_prompt`, `denoise`, `decode_latents`.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import names as N
from .backends import BackendOptions, Session
from .components import Components, check_accelerator_options
from .config import (MAX_IMAGES, GenerationConfig, classifier_free, decoder_in_mode,
                     refuse_negative_prompt_if_embedded, size_multiple)
from .controlnet import (Control, control_size, controlled_predictor, prepare_control,
                         with_zero_residuals)
from .denoise import (STEP_END_TENSORS, Conditioning, StepCallback, StepEndCallback,
                      checked_step_callback, generation_predictor, run_denoising,
                      step_end_callback)
from .edit import (EditInputs, EditStart, edit_kind, finish_images, is_inpainting_unet,
                   prepare_edit, source_size, start_edit)
from .errors import InvalidInputError
from .generation import (OUTPUT_TYPES, Generation, Request, as_output, check_decodable,
                         initial_noise, prompts_of, size_from_latents, timed)
from .image_input import ImageSource
from .manifest import Manifest
from .estimate import check_fits
from .memory import MODES, MemoryPlan, plan_memory
from .models import default_bundle, resolve_model
from .osmem import return_freed_memory
from .preview import Preview, PreviewFn, as_preview, preview_hook, preview_maker
from .schedulers import Scheduler, create_scheduler
from .lora_weights import bundle_overrides, read_loras
from .text_encoder import Encoder, PromptEmbeds, TextOptions, encode_prompts
from .spill import SpillMaps, check_spill_folder
from .tokenizer import PromptTokenizer
from .vae import decode_latents as _decode_whole
from .vae import (decode_latents_tiled, decode_latents_tiny, encode_images, encode_images_tiled,
                  scale_latents)

log = logging.getLogger(__name__)

__all__ = ["Pipeline", "Generation"]


class Pipeline:
    """A loaded text-to-image bundle. Beyond edge_sdk.config.GenerationConfig's parameters,
    a call (or `generate`) takes images:

    `image` (a path, a PIL RGB image or an HxWx3 uint8 array) makes it img2img, as
    diffusers' StableDiffusionImg2ImgPipeline: the image is encoded, noised to the step
    `strength` selects (default 0.8) and denoised from there; `latents` are then that
    noise. With `mask_image` (white = repaint) it is inpainting, as
    StableDiffusionInpaintPipeline (strength default 1.0), with an inpainting UNet (9
    input channels) or an ordinary one (the known region blended back after every
    step). The output is the image's size rounded down to a multiple of 8, unless
    width/height are given. An SDXL bundle takes `prompt_2`, `negative_prompt_2`,
    `original_size`, `crops_coords_top_left` and `target_size` as diffusers'
    StableDiffusionXLPipeline (sizes (height, width), defaults: the image's, (0, 0)).

    `control_image` steers a ControlNet bundle as diffusers'
    StableDiffusionControlNetPipeline's `image` does (one per ControlNet, in bundle
    order; None skips one; resized to the output size; edge_sdk.control preprocesses),
    with `controlnet_conditioning_scale`, `control_guidance_start/end` and `guess_mode`
    (edge_sdk.controlnet).
    """

    def __init__(self, bundle: Path, manifest: Manifest, options: BackendOptions,
                 plan: MemoryPlan | None = None, memory: str = "fast") -> None:
        self.bundle, self.manifest, self.options = bundle, manifest, options
        self.memory = memory  # a mode, or a budget planned for each generation's size
        self.plan = plan or MemoryPlan("fast", False, False, True)
        self.components = Components(bundle, manifest, options, self.plan)
        self._warned_untiled = self._warned_untiled_encoder = False
        self._interrupt = False  # diffusers' flag: a step-end callback sets it to stop
        self.loras: dict[str, float] = {}  # applied at load time: file -> scale
        self.tokenizers = {role: PromptTokenizer(bundle / t.file, t)
                           for role, t in manifest.tokenizers.items()}
        self.tokenizer = self.tokenizers[N.TOKENIZER]  # the (first) text encoder's

    @classmethod
    def load(cls, bundle: str | Path | None = None, *, backend: str = "auto",
             threads: int | None = None, providers: Sequence[str] | None = None,
             verify: bool = True, memory: str = "fast", delegate: str | None = None,
             delegate_options: Mapping[str, str] | None = None,
             loras: Mapping[str | Path, float] | None = None,
             provider_options: Mapping[str, str] | None = None) -> "Pipeline":
        """Open a bundle folder, or a shipped model by name ("shapes", "shapes-lcm"; None =
        the default model).

        `backend`: "auto" (each component's own format), "onnx" or "tflite". `providers`:
        ONNX Runtime execution providers in order (e.g. ["xnnpack"]; ["qnn"]: a w8a8/w8a16
        UNet on the NPU), plugin ones with `provider_options`; `delegate`:
        a TFLite external delegate library (.so) with its `delegate_options`. What is asked
        for and missing is an error naming what to install, not a silent fallback.
        `verify=True` checks every file's sha256 against the manifest before loading (turn it
        off on slow storage; sizes are still checked). `memory` is "fast", "balanced", "low"
        or a budget such as "300MB" (see edge_sdk.memory.MemoryPlan); the plan is logged.
        `loras`: {file: scale}, applied as `set_loras` does."""
        path = resolve_model(bundle) if bundle is not None else default_bundle()
        manifest = Manifest.load(path)
        manifest.verify_files(path, checksums=verify)
        options = BackendOptions.checked(backend, threads, providers, False, delegate,
                                         delegate_options, provider_options)
        check_accelerator_options(manifest, options.providers, options.delegate)
        # a budget is planned for the model's own default generation now, and again for
        # each generation's size (a larger one may need a lower mode)
        plan = plan_memory(memory, manifest, GenerationConfig(seed=0).resolve(manifest))
        if plan.return_freed and not return_freed_memory():
            log.info("could not set the C heap to return freed memory (not glibc)")
        pipe = cls(path, manifest, replace(options, low_memory=plan.map_weights), plan, memory)
        pipe.set_loras(loras or {})
        pipe.components.open_all(manifest.main_roles)
        log.info("loaded %s (%s, %s) from %s; %s", manifest.source.name, manifest.family,
                 manifest.variant, path, plan.describe())
        return pipe

    def set_loras(self, loras: Mapping[str | Path, float]) -> None:
        """Apply LoRAs ({file: scale}; {}: none) to this fp32/fp16 ONNX bundle's UNet and
        text encoder (edge_sdk.lora_weights); only components that change are reopened."""
        read = read_loras(self.bundle, self.manifest, loras)
        for role, weights in bundle_overrides(self.bundle, self.manifest, read).items():
            self.components.set_weights(role, weights)
        self.loras = {str(lora.path): lora.scale for lora in read}

    def session(self, component: str) -> Session:
        """The loaded session of a component (loaded on first use)."""
        return self.components.session(component)

    # -- stages --------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | None = None,
                      num_images: int = 1, guidance_scale: float | None = None,
                      text: TextOptions = TextOptions(), prompt_2: str | None = None,
                      negative_prompt_2: str | None = None) -> PromptEmbeds:
        """Text embeddings for `prompt` (a list: each, in turn) and the negative prompt when
        guidance is on, repeated for `num_images` per prompt; `text`: prompt weighting,
        long prompts and clip skip (edge_sdk.text_encoder.TextOptions). An SDXL bundle's
        second text encoder reads `prompt_2` / `negative_prompt_2` (default: the same);
        each encoder is released after its prompts where the memory plan says."""
        g = self.manifest.defaults.guidance_scale if guidance_scale is None else guidance_scale
        refuse_negative_prompt_if_embedded(self.manifest, negative_prompt)
        if (prompt_2, negative_prompt_2) != (None, None) and len(self.manifest.text.encoders) < 2:
            raise InvalidInputError("prompt_2 / negative_prompt_2: for SDXL models (two text "
                                    f"encoders); this bundle is {self.manifest.variant}")
        encoders = [Encoder(role, lambda role=role: self.session(role),
                            self.tokenizers[self.manifest.tokenizer_of(role)[0]],
                            lambda role=role: self.components.done_with(role))
                    for role in self.manifest.text.encoders]
        return encode_prompts(encoders, self.manifest.text, prompts_of(prompt),
                              negative_prompt, num_images,
                              guidance=classifier_free(self.manifest, g), options=text,
                              prompt_2=prompt_2, negative_prompt_2=negative_prompt_2)

    def scheduler(self, cfg: GenerationConfig) -> Scheduler:
        """The scheduler a resolved config asks for, with the model's prediction type (a
        property of the weights, so the manifest's wins over any scheduler's default)."""
        return create_scheduler(cfg.scheduler, {**self.manifest.scheduler,
                                                "prediction_type": self.manifest.prediction_type},
                                int(cfg.steps or 0))

    def denoise(self, embeds: PromptEmbeds, latents: np.ndarray, *, steps: int | None = None,
                guidance_scale: float | None = None, scheduler: str | None = None,
                seed: int | None = None, callback: StepCallback | None = None,
                cache_interval: int | None = None,
                original_size: tuple[int, int] | None = None,
                crops_coords_top_left: tuple[int, int] | None = None,
                target_size: tuple[int, int] | None = None) -> np.ndarray:
        """Denoise initial noise `latents` ([B, C, h, w], unit variance; scaled here by the
        scheduler's init_noise_sigma) into final latents. An SDXL bundle's original_size,
        crops_coords_top_left and target_size default to the latents' size and (0, 0)."""
        cfg = GenerationConfig(steps=steps, guidance_scale=guidance_scale, scheduler=scheduler,
                               seed=seed, cache_interval=cache_interval,
                               original_size=original_size, target_size=target_size,
                               crops_coords_top_left=crops_coords_top_left)
        cfg = size_from_latents(cfg, latents, self.manifest.vae.scale_factor
                                ).resolve(self.manifest)
        if self.manifest.unet.time_cond_proj_dim and embeds.uncond is not None:
            raise InvalidInputError("this model is LCM-distilled: encode the prompt with "
                                    "guidance off (encode_prompt(..., guidance_scale=1)); "
                                    "its guidance enters as an embedding")
        if classifier_free(self.manifest, float(cfg.guidance_scale or 0)) \
                and embeds.uncond is None:
            raise InvalidInputError(f"guidance_scale={cfg.guidance_scale} needs unconditional "
                                    "embeddings, but these were encoded with guidance off; "
                                    "encode_prompt(..., guidance_scale=...) with the same "
                                    "value")
        return self._denoise(Conditioning.from_prompt(embeds, cfg.time_ids), latents, cfg,
                             np.random.default_rng(cfg.seed), callback)

    def decode_latents(self, latents: np.ndarray, tile: int | None = None,
                       decoder: str = "full") -> np.ndarray:
        """Final latents -> float images [B, H, W, 3] in [0, 1]. With `tile` (latent pixels;
        default: the memory plan's) and a bundle holding the decoder's stages, decoded exactly
        in tiles (edge_sdk.tiling): the same image in a fraction of the memory. `decoder`:
        "full", "tiny" (the bundle's tiny decoder) or "auto" (tiny in memory mode low)."""
        tile = (self.plan.vae_tile or 0) if tile is None else tile
        check_decodable(latents, tile, self.manifest.vae.latent_channels)
        if decoder_in_mode(self.manifest, decoder, self.plan.mode) == "tiny":
            out = decode_latents_tiny(self.session(N.VAE_DECODER_TINY), latents,
                                      self.manifest.vae.tiny_scaling_factor)
            self.components.done_with(N.VAE_DECODER_TINY)
            return out
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
                 steps: int | None = None, guidance_scale: float | None = None,
                 seed: int | None = None, width: int | None = None, height: int | None = None,
                 scheduler: str | None = None, num_images: int = 1, *,
                 prompt_2: str | None = None, negative_prompt_2: str | None = None,
                 original_size: tuple[int, int] | None = None,
                 crops_coords_top_left: tuple[int, int] | None = None,
                 target_size: tuple[int, int] | None = None, decoder: str | None = None,
                 cache_interval: int | None = None, prompt_weighting: bool | None = None,
                 long_prompts: bool | None = None,
                 clip_skip: int | None = None, image: ImageSource | None = None,
                 mask_image: ImageSource | None = None, strength: float | None = None,
                 control_image: ImageSource | Sequence[ImageSource | None] | None = None,
                 controlnet_conditioning_scale: float | Sequence[float] | None = None,
                 control_guidance_start: float | Sequence[float] | None = None,
                 control_guidance_end: float | Sequence[float] | None = None,
                 guess_mode: bool | None = None,
                 padding_mask_crop: int | None = None, paste_back: bool | None = None,
                 encode_mode: str | None = None, latents: np.ndarray | None = None,
                 callback: StepCallback | None = None, preview_every: int = 1,
                 preview: PreviewFn | Preview | None = None, output_type: str = "pil",
                 return_dict: bool = False,
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
        would decode the half-denoised latents). `preview(step, image)` gets a quick PIL
        picture of the first image every `preview_every` steps and at the last
        (edge_sdk.preview.Preview: the bundle's preview decoder or latent-to-RGB map, or
        its tiny decoder).

        The source images of img2img and inpainting, ControlNet control images and SDXL's
        parameters: see the class docstring."""
        given_here = locals()  # each GenerationConfig field is a parameter (a test checks)
        params = {f.name: given_here[f.name] for f in fields(GenerationConfig)}
        given = {k: v for k, v in params.items() if v is not None or k == "num_images"}
        if num_images == 1 and not isinstance(num_images, bool):  # the default: an alias may
            del given["num_images"]                                # set it instead
        config = GenerationConfig.from_kwargs({**given, **aliases})
        result = self.generate(
            prompt, config, image=image, mask_image=mask_image, latents=latents,
            control_image=control_image,
            callback=callback, output_type=output_type, preview=preview,
            preview_every=preview_every, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        if return_dict:
            return result
        return result.images if len(result.images) > 1 else result.images[0]

    def generate(self, prompt: str | Sequence[str], config: GenerationConfig | None = None, *,
                 image: ImageSource | None = None, mask_image: ImageSource | None = None,
                 latents: np.ndarray | None = None, callback: StepCallback | None = None,
                 control_image: Any = None, output_type: str = "pil",
                 callback_on_step_end: StepEndCallback | None = None,
                 callback_on_step_end_tensor_inputs: Sequence[str] = STEP_END_TENSORS,
                 preview: PreviewFn | Preview | None = None, preview_every: int = 1
                 ) -> Generation:
        """Like calling the pipeline, but returns latents, parameters, seeds and stage
        timings. A list of prompts gives `num_images` images for each; image k has its own
        seed, `seed + k`, and its own generator for everything random, so any one image can
        be generated again alone."""
        timings: dict[str, float] = {}
        with timed(timings, "prepare"):  # the inputs read and checked, the plan switched
            req = self._prepare(prompt, config, latents, image, mask_image, control_image)
            if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
                raise InvalidInputError(f"output_type {output_type!r} is not one of "
                                        f"{OUTPUT_TYPES}")
            callback = checked_step_callback(callback, callback_on_step_end,
                                             callback_on_step_end_tensor_inputs)
            previews = as_preview(preview, preview_every, self.manifest, req.plan.mode)
            self._use(req.plan)
        cfg = req.cfg
        self._interrupt = False
        total = int(req.whole.num_images)
        seeds = [int(cfg.seed or 0) + k for k in range(total)]
        rng = [np.random.default_rng(s) for s in seeds]
        with timed(timings, "text_encoder"):
            embeds = self.encode_prompt(req.prompts, cfg.negative_prompt, int(cfg.num_images),
                                        cfg.guidance_scale, TextOptions(
                                            bool(cfg.prompt_weighting),
                                            bool(cfg.long_prompts), int(cfg.clip_skip or 0)),
                                        cfg.prompt_2, cfg.negative_prompt_2)
        f, c = self.manifest.vae.scale_factor, self.manifest.vae.latent_channels
        noise = initial_noise((total, c, int(cfg.height or 0) // f, int(cfg.width or 0) // f),
                              latents, rng)
        sched, start = self.scheduler(cfg), None
        if req.edit is not None:
            with timed(timings, "vae_encoder"):
                start = self._start_edit(req.edit, sched, noise, cfg, rng)
        with timed(timings, "denoise"):
            try:
                final = self._denoise(Conditioning.from_prompt(embeds, cfg.time_ids), noise,
                                      cfg, rng, callback, sched=sched, start=start,
                                      preview=previews, control=req.control)
            finally:
                for role in (N.UNET, N.UNET_SHALLOW, N.VAE_DECODER_TINY,  # (previews: tiny)
                             *(c.component for c in self.manifest.controlnets)):
                    if role == N.UNET or role in self.components.loaded:
                        self.components.done_with(role)
        with timed(timings, "vae_decoder"):
            images: list[Any] = list(final) if output_type == "latent" else \
                finish_images(as_output(output_type, self.decode_latents(
                    final, decoder=str(cfg.decoder or "full"))), req.edit, cfg.paste_back)
            self.components.done_with(N.VAE_DECODER)
        return Generation(images, final, cfg, prompt if isinstance(prompt, str) else
                          req.prompts, timings, seeds,
                          {**(req.edit.parameters() if req.edit is not None else {}),
                           **req.sources})

    @property
    def interrupt(self) -> bool:  # diffusers' name
        return self._interrupt

    def check(self, prompt: str | Sequence[str], config: GenerationConfig | None = None, *,
              latents: np.ndarray | None = None, image: ImageSource | None = None,
              mask_image: ImageSource | None = None, control_image: Any = None
              ) -> GenerationConfig:
        """Everything `generate` checks before it starts, without starting: the prompts, the
        parameters, the source image and mask, the number of images, and that the generation
        fits the memory budget and the memory available (a container's limit included).
        Returns the resolved config (the seed drawn, if none was given); raises the
        InvalidInputError `generate` would. A service calls it before queueing a request."""
        return self._prepare(prompt, config, latents, image, mask_image, control_image).cfg

    def _prepare(self, prompt: str | Sequence[str], config: GenerationConfig | None,
                 latents: np.ndarray | None, image: ImageSource | None = None,
                 mask_image: ImageSource | None = None, control_image: Any = None
                 ) -> "Request":
        """The checked prompts, the resolved config, the config of the whole call (all its
        images), the memory plan for it and the preprocessed source image and mask."""
        prompts = prompts_of(prompt)
        if config is not None and not isinstance(config, GenerationConfig):
            raise InvalidInputError(f"config must be a GenerationConfig, got "
                                    f"{type(config).__name__}; or call the pipeline with "
                                    "keyword arguments")
        config = size_from_latents(config or GenerationConfig(), latents,
                                   self.manifest.vae.scale_factor)
        kind = edit_kind(self.manifest, image, mask_image)
        if kind is not None:
            src, msk, (w, h) = source_size(image, mask_image, config.padding_mask_crop,
                                           self.manifest, size_multiple(self.manifest),
                                           config.width, config.height)
            config = replace(config, width=w, height=h)
        elif control_image is not None and None in (config.width, config.height) \
                and self.manifest.controlnets:  # diffusers: the control image's size
            w, h = control_size(control_image, size_multiple(self.manifest))
            config = replace(config, width=config.width or w, height=config.height or h)
        cfg = config.resolve(self.manifest, kind, control_image is not None)
        control, sources = prepare_control(self.manifest, control_image, cfg) \
            if control_image is not None else (None, {})
        edit = None if kind is None else prepare_edit(src, msk, int(cfg.width or 0),
                                                      int(cfg.height or 0),
                                                      cfg.padding_mask_crop)
        total = len(prompts) * int(cfg.num_images)
        if total > MAX_IMAGES:
            raise InvalidInputError(f"{len(prompts)} prompts x {cfg.num_images} images is "
                                    f"{total}; at most {MAX_IMAGES} images per call")
        whole = replace(cfg, num_images=total)
        plan = self.plan if self.memory in MODES else \
            plan_memory(self.memory, self.manifest, whole)
        # recorded as the decoder this generation uses
        cfg = replace(cfg, decoder=decoder_in_mode(self.manifest, str(cfg.decoder), plan.mode))
        check_fits(self.manifest, whole, plan.mode)  # refuse now, not the OOM killer later
        if plan.spill_maps and plan.vae_tile and self.manifest.vae.decoder_stages:
            check_spill_folder(plan.spill_dir)
        return Request(prompts, cfg, whole, plan, edit, control, sources)

    def _use(self, plan: MemoryPlan) -> None:
        """Switch to another memory plan (its sessions are opened anew when needed)."""
        if plan.mode == self.plan.mode:
            return
        log.info("memory budget %s: %s for this generation", self.memory, plan.describe())
        if plan.return_freed:
            return_freed_memory()
        self.plan, self.options = plan, replace(self.options, low_memory=plan.map_weights)
        self.components = self.components.replan(self.options, plan)

    def _denoise(self, conditioning: Conditioning, noise: np.ndarray, cfg: GenerationConfig,
                 rng: np.random.Generator | list[np.random.Generator],
                 callback: Any, sched: Scheduler | None = None,
                 start: EditStart | None = None, preview: Preview | None = None,
                 control: Control | None = None) -> np.ndarray:
        """Denoise from `noise` (or from an edit's start) with `callback`: a StepCallback,
        or a (callback_on_step_end, tensor inputs) pair, and `preview`."""
        sched = sched or self.scheduler(cfg)
        if isinstance(callback, tuple):
            callback = step_end_callback(callback[0], self, sched, callback[1])
        if start is None:
            latents = (noise * np.float32(sched.init_noise_sigma)).astype(np.float32)
        else:
            latents, conditioning = start.latents, replace(conditioning,
                                                           channels=start.channels)
        if conditioning.batch != latents.shape[0]:
            raise InvalidInputError(f"{conditioning.batch} prompt embeddings for "
                                    f"{latents.shape[0]} latents")
        if control is not None:
            predict = controlled_predictor(
                self.session(N.UNET), self.session, control, self.manifest, conditioning,
                float(cfg.guidance_scale), (sched.begin_index, len(sched.timesteps)),
                self.plan.batch_cfg)
        else:  # (a ControlNet bundle's UNet then takes zero residuals)
            predict = generation_predictor(
                self.session, self.manifest.unet.time_cond_proj_dim, with_zero_residuals(
                    self.manifest, conditioning, latents.shape[2:]),
                float(cfg.guidance_scale), int(cfg.cache_interval or 1), self.plan.batch_cfg)
        observe = None if preview is None else preview_hook(
            preview.fn, preview.every,
            preview_maker(self.manifest, self.plan.mode, self.session, preview.source))
        return run_denoising(predict, sched, latents, rng, callback,
                             start.after_step if start is not None else None, observe)

    # -- img2img and inpainting ----------------------------------------------------------
    def encode_image(self, images: np.ndarray, tile: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Float images [1, H, W, 3] in [0, 1] -> the VAE encoder's latent distribution
        (mean, logvar), in the VAE's own latent space. With `tile` (latent pixels; default:
        the memory plan's) and a bundle holding the encoder's stages, encoded exactly in
        tiles, as decode_latents decodes."""
        tile = (self.plan.vae_tile or 0) if tile is None else tile
        vae = self.manifest.vae
        if tile and vae.encoder_stages:
            alloc = SpillMaps(self.plan.spill_dir) if self.plan.spill_maps else np.empty
            return encode_images_tiled(self.components, images, vae, tile * vae.scale_factor,
                                       alloc)
        if tile and not self._warned_untiled_encoder:
            self._warned_untiled_encoder = True
            log.warning("this bundle has no VAE encoder stages: encoding untiled, with the "
                        "full-resolution maps in memory (re-convert it to encode in tiles)")
        return encode_images(self.session(N.VAE_ENCODER), images)

    def _start_edit(self, edit: EditInputs, sched: Scheduler, noise: np.ndarray,
                    cfg: GenerationConfig, rng: list[np.random.Generator]) -> EditStart:
        try:
            return start_edit(edit, sched, noise, float(cfg.strength or 0), self.encode_image,
                              lambda z: scale_latents(z, self.manifest.vae), rng,
                              cfg.encode_mode == "sample", is_inpainting_unet(self.manifest),
                              self.manifest.vae.scale_factor)
        finally:
            self.components.done_with(N.VAE_ENCODER)
