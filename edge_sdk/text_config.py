"""A generation's text options and SDXL conditions, resolved against the bundle: what
GenerationConfig.resolve asks of the model's text encoders and UNet (edge_sdk.config)."""

from __future__ import annotations

import numbers
from typing import Any

from .contracts import TextEncoderIO, UnetIO
from .errors import InvalidInputError
from .manifest import Manifest
from .names import TEXT_ENCODER, UNET
from .tokenizer import check_prompt

# SDXL's size conditioning: numbers the model embeds (it saw originals up to a few thousand
# pixels); bounded only so the embedding stays finite and meaningful
MAX_CONDITION = 32768


def WxH(text: str) -> tuple[int, int]:  # noqa: N802 (argparse names the type in errors)
    """A CLI size given as WxH (as --sizes), returned (height, width) as diffusers takes."""
    w, h = (int(p) for p in str(text).lower().split("x"))  # ValueError: argparse reports
    return h, w


def TOP_LEFT(text: str) -> tuple[int, int]:  # noqa: N802
    """A CLI crop corner given as TOP,LEFT."""
    top, left = (int(p) for p in str(text).split(","))
    return top, left


def added_conditions(manifest: Manifest, cfg: Any, width: int, height: int) -> dict[str, Any]:
    """SDXL's second prompts and micro-conditioning resolved (refused for a model
    without them)."""
    second = {"prompt_2": cfg.prompt_2, "negative_prompt_2": cfg.negative_prompt_2}
    sizes = {"original_size": cfg.original_size, "target_size": cfg.target_size,
             "crops_coords_top_left": cfg.crops_coords_top_left}
    given = [k for k, v in {**second, **sizes}.items() if v is not None]
    if given and not manifest.added_conditions:
        raise InvalidInputError(f"{', '.join(given)}: for SDXL models (two text encoders "
                                f"and added conditions); this bundle is "
                                f"{manifest.variant}, leave them out")
    for name, value in second.items():
        if value is not None:
            check_prompt(value, name)
    if not manifest.added_conditions:
        return {}
    return dict(original_size=_pair("original_size", cfg.original_size, (height, width)),
                target_size=_pair("target_size", cfg.target_size, (height, width)),
                crops_coords_top_left=_pair("crops_coords_top_left",
                                            cfg.crops_coords_top_left, (0, 0), lo=0))


def _pair(name: str, value: Any, default: tuple[int, int], lo: int = 1) -> tuple[int, int]:
    """SDXL micro-conditioning: two whole numbers (a size's height and width, or a crop's
    top and left), embedded as the model was trained, not used as pixel counts."""
    if value is None:
        return default
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2 \
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value) \
            or not all(lo <= v <= MAX_CONDITION for v in value):
        raise InvalidInputError(f"{name} must be two whole numbers in [{lo}, {MAX_CONDITION}]"
                                f" ({'top, left' if lo == 0 else 'height, width'}, as in "
                                f"diffusers), got {value!r}")
    return int(value[0]), int(value[1])


def _skippable(manifest: Manifest) -> int | None:
    """The most layers clip skip can skip in every text encoder (None: one exposes none)."""
    states = TextEncoderIO.HIDDEN_LAYERS if manifest.text.penultimate else \
        TextEncoderIO.LAYER_STATES
    counts = [next((t.shape[1] for t in manifest.components[e].outputs if t.name == states),
                   None) for e in manifest.text.encoders]
    if not all(isinstance(n, int) for n in counts):
        return None
    # SDXL already reads the penultimate layer: one fewer to skip
    return min(int(n) for n in counts) - int(manifest.text.penultimate)  # type: ignore


def check_text_options(manifest: Manifest, weighting: Any, long: Any,
                       clip_skip: Any) -> dict[str, Any]:
    """prompt_weighting (None: on), long_prompts (None: off) and clip_skip (None: 0) as
    this bundle can serve them."""
    out = {}
    for name, value, default in (("prompt_weighting", weighting, True),
                                 ("long_prompts", long, False)):
        if value is not None and not isinstance(value, bool):
            raise InvalidInputError(f"{name} must be True or False, got {value!r}")
        out[name] = default if value is None else value
    text, unet = manifest.components[TEXT_ENCODER], manifest.components.get(UNET)
    context = next((t for t in unet.inputs if t.name == UnetIO.CONTEXT), None) if unet else None
    fixed = context is not None and isinstance(context.shape[1], int)  # an NPU's UNet
    if out["long_prompts"] and (text.format == "tflite" or fixed):
        raise InvalidInputError(f"long_prompts: this bundle's models have static shapes "
                                f"that take one window of {manifest.tokenizer.max_length} "
                                "tokens; leave long_prompts off (longer prompts are "
                                "truncated) or use a bundle with dynamic shapes")
    layers = _skippable(manifest)
    skip = 0 if clip_skip is None else clip_skip
    if isinstance(skip, bool) or not isinstance(skip, numbers.Integral) or skip < 0:
        raise InvalidInputError(f"clip_skip must be a whole number >= 0 (layers skipped from "
                                f"the end), got {clip_skip!r}")
    skip = int(skip)
    if skip and not isinstance(layers, int):
        fix = ("TFLite text encoders do not expose them" if text.format == "tflite" else
               "it was converted before clip skip existed: re-convert the checkpoint with "
               "`edge-convert CHECKPOINT -o BUNDLE --overwrite`")
        raise InvalidInputError(f"clip_skip={skip}: this bundle's text encoder exposes no "
                                f"earlier layers ({fix}); or leave clip_skip at 0")
    if skip and skip > layers:  # (clip_skip = layers reads the token embeddings)
        which = "this text encoder has" if len(manifest.text.encoders) == 1 else \
            "this bundle's text encoders have"
        raise InvalidInputError(f"clip_skip={skip}: {which} "
                                f"{layers + int(manifest.text.penultimate)} layers; clip_skip "
                                f"must be in [0, {layers}]")
    out["clip_skip"] = skip
    return out
