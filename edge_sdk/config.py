"""What the caller asks for: the generation parameters, declared once.

`GenerationConfig` is the one declaration of every per-call parameter: its field, default
(`None` = the model's default, from the manifest), help text, command-line flag and the
diffusers names accepted for it. `Pipeline.__call__` takes the same parameters (a test checks
the two agree) and the CLI's flags are made from it (`add_arguments`).
"""

from __future__ import annotations

import logging
import math
import numbers
import secrets
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from .control_config import resolve_control
from .errors import InvalidInputError
from .names import DECODERS, UNET_SHALLOW
from .manifest import Manifest
from .schedulers import resolve_scheduler
from .text_config import TOP_LEFT, WxH, added_conditions, check_text_options
from .tokenizer import check_prompt

log = logging.getLogger(__name__)

MAX_SIDE = 8192
MAX_IMAGES = 64
MAX_STEPS = 1000
MAX_GUIDANCE = 100
# the fields that only apply with a source image (img2img, inpainting)
EDIT_FIELDS = ("strength", "padding_mask_crop", "paste_back", "encode_mode")
ENCODE_MODES = ("sample", "mean")  # diffusers' retrieve_latents: "sample" / "argmax"


def _param(default: Any, help: str, *, flag: str | None = None, type: Any = None,
           aliases: tuple[str, ...] = (), switch: bool | None = None,
           repeat: bool = False) -> Any:
    """A generation parameter: `flag` is its CLI spelling (default: --field-name), `type`
    the CLI's parser, `aliases` other keyword names (diffusers') that mean the same;
    `switch`: the flag takes no value and sets this; `repeat`: the flag may be given once
    per ControlNet (a list)."""
    return field(default=default, metadata={"help": help, "flag": flag, "type": type,
                                            "aliases": aliases, "switch": switch,
                                            "repeat": repeat})


def uses_guidance(guidance_scale: float) -> bool:
    """Classifier-free guidance is on only above 1, as in diffusers."""
    return guidance_scale > 1.0


def classifier_free(manifest: Manifest, guidance_scale: float) -> bool:
    """Whether a generation runs the unconditional pass: guidance above 1, on a UNet that
    does not embed the scale (an LCM-distilled one takes it as `timestep_cond`)."""
    return uses_guidance(guidance_scale) and not manifest.unet.time_cond_proj_dim


@dataclass(frozen=True)
class GenerationConfig:
    """Per-call generation settings. `None` means the model's default (its manifest)."""

    negative_prompt: str | None = _param(None, "what the image should not show", type=str)
    # SDXL (two text encoders): what the second reads (default: the prompt / negative prompt)
    prompt_2: str | None = _param(None, "SDXL: the prompt for the second text encoder "
                                  "(default: the prompt)", type=str)
    negative_prompt_2: str | None = _param(None, "SDXL: the negative prompt for the second "
                                           "text encoder (default: the negative prompt)",
                                           type=str)
    steps: int | None = _param(None, "denoising steps (default: the model's)", type=int,
                               aliases=("num_inference_steps",))
    guidance_scale: float | None = _param(None, "guidance scale; <= 1 turns classifier-free "
                                          "guidance off (an LCM-distilled model embeds it "
                                          "instead; default: the model's)", flag="--guidance",
                                          type=float)
    seed: int | None = _param(None, "random seed (default: a fresh one, recorded in the "
                              "result)", type=int)
    width: int | None = _param(None, "image width in pixels (default: the model's)", type=int)
    height: int | None = _param(None, "image height in pixels (default: the model's)",
                                type=int)
    scheduler: str | None = _param(None, "e.g. euler, euler_a, ddim, pndm, dpmpp_2m, "
                                   "dpmpp_2m_karras, lcm, or a diffusers class name "
                                   "(default: the model's)", type=str)
    num_images: int = _param(1, "images generated from the prompt", type=int,
                             aliases=("num_images_per_prompt",))
    decoder: str | None = _param(None, "full (the VAE's), tiny (the bundle's tiny decoder, "
                                 "an AutoencoderTiny such as TAESD) or auto (tiny in memory "
                                 "mode low, where the bundle has one); default full",
                                 type=str)
    cache_interval: int | None = _param(None, "feature caching (DeepCache): run the whole "
                                        "UNet every N-th step and only its shallow branch "
                                        "between, reusing its deep features (typically 2-5; "
                                        "default 1: every step whole)", type=int)
    prompt_weighting: bool | None = _param(None, "do not read A1111's weighting syntax in "
                                           "prompts, (word:1.3), (word), [word] (default: "
                                           "read it)", flag="--no-prompt-weighting",
                                           switch=False)
    long_prompts: bool | None = _param(None, "read prompts beyond the text encoder's 77 tokens "
                                       "as A1111 does, in chunks of 75 (default: truncate, "
                                       "with a warning)", switch=True)
    clip_skip: int | None = _param(None, "skip the text encoder's last N layers, as diffusers' "
                                   "clip_skip (A1111's 'Clip skip' N+1; default 0)", type=int)
    # SDXL's micro-conditioning, as diffusers' StableDiffusionXLPipeline: (height, width),
    # (height, width) and (top, left); default the image's size and (0, 0)
    original_size: tuple[int, int] | None = _param(
        None, "SDXL: the size the model is told the source image had, WxH (default: the "
        "image's)", type=WxH)
    crops_coords_top_left: tuple[int, int] | None = _param(
        None, "SDXL: the crop's top-left corner the model is told of, TOP,LEFT (default 0,0)",
        flag="--crops-coords-top-left", type=TOP_LEFT)
    target_size: tuple[int, int] | None = _param(
        None, "SDXL: the target size the model is told of, WxH (default: the image's)",
        type=WxH)
    # img2img and inpainting (given an image; refused without one)
    strength: float | None = _param(None, "with --image: how much of it is repainted, 0-1 "
                                    "(default 0.8; with --mask 1.0)", type=float)
    padding_mask_crop: int | None = _param(None, "with --mask: repaint only the box around "
                                           "the mask grown by this many pixels, at the "
                                           "model's size, and paste it back", type=int)
    paste_back: bool | None = _param(None, "with --mask: keep the source's pixels outside "
                                     "the mask (default: only with --padding-mask-crop)",
                                     type=lambda v: _flag("paste_back", v))
    encode_mode: str | None = _param(None, "with --image: 'sample' the image's latents "
                                     "from the VAE's distribution with the seed (default) "
                                     "or take its 'mean'", type=str)

    # ControlNet (given control images; refused without): one value, or one per ControlNet
    controlnet_conditioning_scale: float | tuple[float, ...] | None = _param(
        None, "with --control-image: how strongly the ControlNet steers (default 1.0); "
        "repeat it once per ControlNet", flag="--control-scale", type=float, repeat=True)
    control_guidance_start: float | tuple[float, ...] | None = _param(
        None, "with --control-image: the fraction of the steps after which the ControlNet "
        "starts (default 0); repeatable", flag="--control-start", type=float, repeat=True)
    control_guidance_end: float | tuple[float, ...] | None = _param(
        None, "with --control-image: the fraction of the steps after which it stops "
        "(default 1); repeatable", flag="--control-end", type=float, repeat=True)
    guess_mode: bool | None = _param(None, "with --control-image: the ControlNet steers "
                                     "the conditional branch only, its residuals ramped "
                                     "from 0.1 to 1 (diffusers' guess_mode)", switch=True)

    @classmethod
    def from_kwargs(cls, params: Mapping[str, Any]) -> "GenerationConfig":
        """A config from keyword arguments, accepting each field's aliases; an unknown name
        is an InvalidInputError listing the accepted ones."""
        names = {f.name: f.name for f in fields(cls)}
        names.update({a: f.name for f in fields(cls) for a in f.metadata["aliases"]})
        values: dict[str, Any] = {}
        for key, value in params.items():
            if key not in names:
                raise InvalidInputError(f"unknown generation parameter {key!r}; accepted: "
                                        f"{sorted(names)}")
            if names[key] in values:
                raise InvalidInputError(f"{key!r} repeats another name of {names[key]!r}")
            values[names[key]] = value
        return cls(**values)

    def resolve(self, manifest: Manifest, edit: str | None = None,
                controlled: bool = False) -> "GenerationConfig":
        """Every field concrete and checked: the model's defaults filled in, a seed drawn.
        `edit` is "img2img" or "inpaint" when there is a source image (its fields are
        resolved), None for text-to-image (they must be None); `controlled`: there are
        control images (the ControlNet fields are resolved; without, they must be None)."""
        d = manifest.defaults
        steps = _int("steps", d.steps if self.steps is None else self.steps, 1, MAX_STEPS)
        g = d.guidance_scale if self.guidance_scale is None else self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, numbers.Real) or not _finite(g) \
                or not 0 <= g <= MAX_GUIDANCE:
            raise InvalidInputError(f"guidance_scale must be a finite number in [0, "
                                    f"{MAX_GUIDANCE}], got {g!r}; values <= 1 turn "
                                    "classifier-free guidance off")
        width = _side("width", d.width if self.width is None else self.width, manifest,
                      self.width is not None)
        height = _side("height", d.height if self.height is None else self.height, manifest,
                       self.height is not None)
        seed = secrets.randbits(63) if self.seed is None else _int("seed", self.seed, 0,
                                                                  2**63 - 1)
        n = _int("num_images", self.num_images, 1, MAX_IMAGES)
        static = manifest.static_sizes
        if static and (height, width) not in static:
            raise InvalidInputError(
                f"{width}x{height}: this bundle's models have static shapes (TFLite, or an "
                f"NPU's UNet), made for {', '.join(f'{w}x{h}' for h, w in static)}; choose "
                "one of those sizes, or re-convert with `edge-convert --sizes WxH`")
        if self.negative_prompt is not None:
            check_prompt(self.negative_prompt, "negative_prompt")
            refuse_negative_prompt_if_embedded(manifest, self.negative_prompt)
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise InvalidInputError(f"scheduler must be a name (a string) or None, got "
                                    f"{self.scheduler!r}; `edge-sdk schedulers` lists them")
        decoder = check_decoder(manifest, self.decoder or "full")
        interval = check_cache_interval(manifest, self.cache_interval)
        cls, _ = resolve_scheduler(self.scheduler, manifest.scheduler)
        return replace(self, steps=steps, guidance_scale=float(g), width=width, height=height,
                       seed=seed, scheduler=self.scheduler or cls.class_name, num_images=n,
                       decoder=decoder, cache_interval=interval,
                       **check_text_options(manifest, self.prompt_weighting,
                                            self.long_prompts, self.clip_skip),
                       **added_conditions(manifest, self, width, height),
                       **self._edit_fields(edit),
                       **resolve_control(manifest, self, controlled))

    def _edit_fields(self, edit: str | None) -> dict[str, Any]:
        """The img2img / inpainting fields resolved (or refused without an image)."""
        given = [k for k in EDIT_FIELDS if getattr(self, k) is not None]
        if edit is None:
            if given:
                verb = "needs" if len(given) == 1 else "need"
                raise InvalidInputError(f"{', '.join(given)} {verb} a source image: give "
                                        "image= (--image), or leave them out")
            return {}
        inpaint = edit == "inpaint"
        if not inpaint and (self.padding_mask_crop is not None or self.paste_back):
            raise InvalidInputError("padding_mask_crop and paste_back are for inpainting: "
                                    "give mask_image= (--mask)")
        if self.strength is None:
            strength = 1.0 if inpaint else 0.8  # diffusers' defaults
        elif isinstance(self.strength, bool) or not isinstance(self.strength, numbers.Real) \
                or not _finite(self.strength) or not 0 <= self.strength <= 1:
            raise InvalidInputError(f"strength must be a number in [0, 1] (how much of the "
                                    f"image is repainted: 1 = all of it), got "
                                    f"{self.strength!r}")
        else:
            strength = float(self.strength)
        crop = None if self.padding_mask_crop is None else \
            _int("padding_mask_crop", self.padding_mask_crop, 0, MAX_SIDE)
        if self.paste_back is not None and not isinstance(self.paste_back, bool):
            raise InvalidInputError(f"paste_back must be True or False, got {self.paste_back!r}")
        mode = self.encode_mode or ENCODE_MODES[0]
        if mode not in ENCODE_MODES:
            raise InvalidInputError(f"encode_mode must be 'sample' or 'mean', got {mode!r}")
        paste = None if not inpaint else \
            crop is not None if self.paste_back is None else self.paste_back
        if crop is not None and self.paste_back is False:
            log.info("padding_mask_crop with paste_back=False: the repainted box replaces "
                     "the source's box whole, mask or not")
        return dict(strength=strength, padding_mask_crop=crop, encode_mode=mode,
                    paste_back=paste)

    @property
    def time_ids(self) -> tuple[int, ...] | None:
        """A resolved config's SDXL time ids: original size, crop's top-left and target size
        (diffusers' add_time_ids); None for a model without added conditions."""
        if self.original_size is None or self.target_size is None:
            return None
        return (*self.original_size, *(self.crops_coords_top_left or (0, 0)),
                *self.target_size)

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance is on (a resolved config's guidance_scale > 1)."""
        return uses_guidance(float(self.guidance_scale or 0.0))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_arguments(parser: Any, only: tuple[str, ...] | None = None) -> None:
    """Add a CLI flag for each generation parameter (or those in `only`) to an argparse
    parser; `config_from_arguments` reads them back."""
    for f in fields(GenerationConfig):
        if only is not None and f.name not in only:
            continue
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if f.metadata["repeat"]:
            parser.add_argument(flag, dest=f.name, type=f.metadata["type"], action="append",
                                default=f.default, help=f.metadata["help"])
            continue
        if f.metadata["switch"] is not None:
            parser.add_argument(flag, dest=f.name, action="store_const",
                                const=f.metadata["switch"], default=f.default,
                                help=f.metadata["help"])
            continue
        parser.add_argument(flag, dest=f.name, type=f.metadata["type"], default=f.default,
                            help=f.metadata["help"])


def config_from_arguments(args: Any, **overrides: Any) -> GenerationConfig:
    """The GenerationConfig of parsed CLI arguments (flags made by add_arguments)."""
    given = {f.name: getattr(args, f.name) for f in fields(GenerationConfig)
             if hasattr(args, f.name)}
    return GenerationConfig(**{**given, **overrides})


def _finite(x: numbers.Real) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond any float
        return False


def size_multiple(manifest: Manifest) -> int:
    """What image sides must be multiples of: the VAE's factor, and what the UNet graph
    needs (bundles converted before its graph took any size record their levels')."""
    return math.lcm(manifest.vae.scale_factor, manifest.unet.size_multiple)


def check_decoder(manifest: Manifest, decoder: Any) -> str:
    """A decoder choice ("full" | "tiny" | "auto") this bundle can serve."""
    if decoder not in DECODERS:
        raise InvalidInputError(f"decoder must be one of {list(DECODERS)}, got {decoder!r}")
    if decoder == "tiny" and not manifest.vae.tiny_scaling_factor:
        raise InvalidInputError("decoder='tiny': this bundle has no tiny decoder; convert it "
                                "with `edge-convert ... --tiny-vae FOLDER` (a diffusers "
                                "AutoencoderTiny such as TAESD)")
    return str(decoder)


def decoder_in_mode(manifest: Manifest, decoder: Any, mode: str) -> str:
    """"full" or "tiny": what `decoder` ("full" | "tiny" | "auto") means in memory mode
    `mode` (auto: tiny in low, where the bundle has one)."""
    decoder = check_decoder(manifest, decoder)
    has = bool(manifest.vae.tiny_scaling_factor)
    return "tiny" if decoder == "tiny" or (decoder == "auto" and has and mode == "low") \
        else "full"


def check_cache_interval(manifest: Manifest, interval: Any) -> int:
    """A feature-caching interval this bundle can serve (None: 1, off)."""
    value = _int("cache_interval", 1 if interval is None else interval, 1, MAX_STEPS)
    if value > 1 and UNET_SHALLOW not in manifest.components:
        formats = {c.format for c in manifest.components.values()}
        if "tflite" in formats:
            why = "TFLite bundles run every step whole"
        elif manifest.converter.get("int8_method") == "static":
            why = "static int8 bundles are converted without it"
        else:
            why = ("it was converted without one (--no-feature-cache, an older converter, or "
                   "a UNet that cannot be split); where you have its checkpoint, re-convert "
                   "it with `edge-convert CHECKPOINT -o BUNDLE --overwrite`")
        raise InvalidInputError(f"cache_interval={value}: this bundle has no shallow UNet "
                                f"branch for feature caching; {why}, or leave "
                                "cache_interval at 1")
    return value


def refuse_negative_prompt_if_embedded(manifest: Manifest, negative_prompt: Any) -> None:
    """An LCM-distilled UNet has no unconditional pass for a negative prompt to steer."""
    if negative_prompt is not None and manifest.unet.time_cond_proj_dim:
        raise InvalidInputError("this model is LCM-distilled (guidance is embedded, there is "
                                "no unconditional pass): it takes no negative_prompt")


def _flag(name: str, value: str) -> bool:
    """A yes/no command-line value."""
    v = value.strip().lower()
    if v in ("1", "yes", "true", "on"):
        return True
    if v in ("0", "no", "false", "off"):
        return False
    raise InvalidInputError(f"--{name.replace('_', '-')} takes yes or no, got {value!r}")


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    """An integer parameter (numpy integers too), checked against its range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidInputError(f"{name} must be in [{lo}, {hi}], got {value}")
    return int(value)


def _side(name: str, value: Any, manifest: Manifest, given: bool = True) -> int:
    """A width or height: a positive multiple of what both the VAE and the UNet need."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInputError(f"{name} must be an integer number of pixels, got {value!r}")
    value = int(value)
    multiple = size_multiple(manifest)
    what = f"{name}={value}" if given else f"the model's default {name} ({value})"
    if value <= 0 or value % multiple:
        fix = (f"try {max(multiple, round(value / multiple) * multiple)}" if given
               else "re-convert the bundle")
        raise InvalidInputError(f"{what}: this model needs sizes that are positive multiples "
                                f"of {multiple} pixels; {fix}")
    if value > MAX_SIDE:
        raise InvalidInputError(f"{what} exceeds the maximum of {MAX_SIDE} pixels")
    return value
