"""What the caller asks for (GenerationConfig, `None` = the model's default) and its
validation against what the model ships with (the manifest)."""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from . import names
from .errors import InvalidInputError
from .manifest import Manifest
from .schedulers import resolve_scheduler

MAX_SIDE = 8192
MAX_IMAGES = 64


@dataclass(frozen=True)
class GenerationConfig:
    """Per-call generation settings. `None` means the model's default (its manifest)."""

    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None  # None = a fresh random seed (recorded in the result)
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None  # short name or diffusers class name; None = the bundle's
    num_images: int = 1

    def resolve(self, manifest: Manifest) -> "ResolvedConfig":
        d = manifest.defaults
        steps = _int("steps", d.steps if self.steps is None else self.steps, 1, 1000)
        g = d.guidance_scale if self.guidance_scale is None else self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) \
                or not 0 <= g <= 100:
            raise InvalidInputError(f"guidance_scale must be a finite number in [0, 100], got "
                                    f"{g!r}; values <= 1 turn classifier-free guidance off")
        width = _side("width", d.width if self.width is None else self.width, manifest)
        height = _side("height", d.height if self.height is None else self.height, manifest)
        seed = secrets.randbits(63) if self.seed is None else _int("seed", self.seed, 0, 2**63 - 1)
        n = _int("num_images", self.num_images, 1, MAX_IMAGES)
        static = manifest.extra.get(names.TFLITE_SIZES)
        if static and [height, width] not in [list(x) for x in static]:
            raise InvalidInputError(
                f"{width}x{height}: this bundle's TFLite models have static shapes, exported "
                f"for {', '.join(f'{w}x{h}' for h, w in static)}; choose one of those sizes, "
                "or re-convert with `edge-convert --format tflite --sizes WxH,...`")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidInputError("negative_prompt must be a string or None")
        cls, _ = resolve_scheduler(self.scheduler, manifest.scheduler)
        return ResolvedConfig(negative_prompt=self.negative_prompt, steps=steps,
                              guidance_scale=float(g), seed=seed, width=width, height=height,
                              scheduler=self.scheduler or cls.class_name, num_images=n)


@dataclass(frozen=True)
class ResolvedConfig:
    """Every setting of one generation, concrete and validated."""

    negative_prompt: str | None
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    scheduler: str
    num_images: int

    @property
    def guidance(self) -> bool:
        """Classifier-free guidance is on only above 1 (as in diffusers)."""
        return self.guidance_scale > 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise InvalidInputError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _side(name: str, value: Any, manifest: Manifest) -> int:
    f = manifest.vae.scale_factor
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{name} must be an integer number of pixels, got {value!r}")
    if value <= 0 or value % f:
        raise InvalidInputError(f"{name} must be a positive multiple of {f} pixels, got {value}; "
                                f"try {max(f, round(value / f) * f)}")
    multiple = int(manifest.extra.get(names.SIZE_MULTIPLE, f))
    if value % multiple:
        raise InvalidInputError(f"{name}={value}: this model's UNet needs sizes that are "
                                f"multiples of {multiple} pixels; try "
                                f"{max(multiple, round(value / multiple) * multiple)}")
    if value > MAX_SIDE:
        raise InvalidInputError(f"{name}={value} exceeds the maximum of {MAX_SIDE} pixels")
    return value
