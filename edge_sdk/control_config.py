"""The ControlNet generation parameters, checked and resolved as diffusers'
`StableDiffusionControlNetPipeline.check_inputs` does: one scale and one guidance window
per ControlNet of the bundle (a single number serves them all), 0 <= start < end <= 1."""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import InvalidInputError
from .manifest import Manifest

CONTROL_FIELDS = ("controlnet_conditioning_scale", "control_guidance_start",
                  "control_guidance_end", "guess_mode")
MAX_CONTROL_SCALE = 100.0


def per_net(name: str, value: Any, count: int, default: float) -> tuple[float, ...]:
    """A number or a list of one number per ControlNet -> `count` floats."""
    if value is None:
        return (default,) * count
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) == 1:  # one number in a list (a flag given once) serves them all
        values = values * count
    if len(values) != count:
        raise InvalidInputError(f"{name} has {len(values)} values for this bundle's {count} "
                                f"ControlNet(s); give one number, or one per ControlNet in "
                                "bundle order")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise InvalidInputError(f"{name} must be finite numbers, got {value!r}")
        out.append(float(v))
    return tuple(out)


def require_controlnets(manifest: Manifest) -> None:
    if not manifest.controlnets:
        raise InvalidInputError("control_image: this bundle has no ControlNet; convert one "
                                "into it with `edge-convert CHECKPOINT -o BUNDLE "
                                "--controlnet PATH`")


def resolve_control(manifest: Manifest, cfg: Any, controlled: bool) -> dict[str, Any]:
    """The ControlNet fields of a config resolved (with control images) or refused
    (without: they need one)."""
    given = [k for k in CONTROL_FIELDS if getattr(cfg, k) is not None]
    if not controlled:
        if given:
            raise InvalidInputError(f"{', '.join(given)} need a control image: give "
                                    "control_image= (--control-image), or leave them out")
        return {}
    require_controlnets(manifest)
    if cfg.padding_mask_crop is not None:
        raise InvalidInputError("padding_mask_crop with a control image is not supported (the "
                                "control would have to be cropped with the mask's box); "
                                "crop the control image yourself or leave padding_mask_crop "
                                "out")
    if cfg.cache_interval not in (None, 1):
        raise InvalidInputError("cache_interval with a control image: feature caching reuses "
                                "deep features that the ControlNet's residuals change every "
                                "step; leave cache_interval at 1")
    n = len(manifest.controlnets)
    scale = per_net("controlnet_conditioning_scale", cfg.controlnet_conditioning_scale, n, 1.0)
    start = per_net("control_guidance_start", cfg.control_guidance_start, n, 0.0)
    end = per_net("control_guidance_end", cfg.control_guidance_end, n, 1.0)
    if any(not 0 <= s <= MAX_CONTROL_SCALE for s in scale):
        raise InvalidInputError(f"controlnet_conditioning_scale must be in [0, "
                                f"{MAX_CONTROL_SCALE}], got {list(scale)}")
    for s, e in zip(start, end):
        if not 0.0 <= s < e <= 1.0:
            raise InvalidInputError(f"control guidance window start={s}, end={e}: need "
                                    "0 <= start < end <= 1 (fractions of the steps)")
    guess = cfg.guess_mode
    if guess is not None and not isinstance(guess, bool):
        raise InvalidInputError(f"guess_mode must be True or False, got {guess!r}")
    return dict(controlnet_conditioning_scale=scale, control_guidance_start=start,
                control_guidance_end=end, guess_mode=bool(guess))
