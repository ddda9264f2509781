"""What a generation returns (`Generation`) and the small helpers around it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
from PIL import Image

from .config import GenerationConfig
from .edit import EditInputs
from .memory import MemoryPlan
from .denoise import batch_noise
from .errors import InvalidInputError
from .image import to_pil
from .tokenizer import check_prompt

__all__ = ["Generation", "Request", "OUTPUT_TYPES", "timed", "size_from_latents", "as_output",
           "check_decodable", "prompts_of", "initial_noise"]


@dataclass
class Generation:
    """The full result of one generation."""

    images: list[Image.Image]
    latents: np.ndarray  # final latents, [images, C, h, w]
    config: GenerationConfig  # resolved: every field concrete
    prompt: str | list[str]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    seeds: list[int] = field(default_factory=list)  # image k's own seed (config.seed + k)
    # img2img / inpainting: the sha256 of the source image and mask (image_sha256, ...)
    sources: dict[str, Any] = field(default_factory=dict)

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
                "seed": seed, "num_images": 1, **self.sources}


class timed:
    """Context manager adding the block's wall time to timings[key]."""

    def __init__(self, timings: dict[str, float], key: str) -> None:
        self.timings, self.key = timings, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.key] = time.perf_counter() - self.t0


def size_from_latents(config: GenerationConfig, latents: np.ndarray | None,
                       factor: int) -> GenerationConfig:
    """Given latents and no size, the image size is the latents' (times the VAE factor)."""
    if latents is None or config.width is not None or config.height is not None:
        return config
    arr = np.asarray(latents)
    if arr.ndim != 4:
        return config
    return replace(config, width=arr.shape[3] * factor, height=arr.shape[2] * factor)


OUTPUT_TYPES = ("pil", "np", "latent")


def as_output(output_type: str, pixels: np.ndarray) -> list[Any]:
    """Decoded float images [B, H, W, 3] as PIL images or as arrays."""
    return to_pil(pixels) if output_type == "pil" else list(pixels)


def check_decodable(latents: Any, tile: Any, channels: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 0:
        raise InvalidInputError(f"tile must be a whole number of latent pixels (0: untiled), "
                                f"got {tile!r}")
    shape = getattr(latents, "shape", None)
    if shape is None or len(shape) != 4 or shape[1] != channels or min(shape) < 1:
        raise InvalidInputError(f"latents to decode must be an array [batch, {channels}, "
                                f"height, width] with every side >= 1, got shape {shape}")


def prompts_of(prompt: str | Sequence[str]) -> list[str]:
    """One prompt or a non-empty list of them, each checked."""
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise InvalidInputError("the list of prompts is empty")
        return [check_prompt(p, f"prompt {k}") for k, p in enumerate(prompt)]
    return [check_prompt(prompt)]


def initial_noise(shape: tuple[int, int, int, int], latents: np.ndarray | None,
                  rng: list[np.random.Generator]) -> np.ndarray:
    """The initial noise [images, C, h, w]: image k's drawn from rng[k], or the caller's
    `latents` checked against the shape."""
    if latents is None:
        return batch_noise(rng, shape)
    arr = np.asarray(latents)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.shape != shape:
        raise InvalidInputError(f"latents must have shape {shape} for {shape[0]} image(s) of "
                                f"{shape[3]}x{shape[2]} latent pixels, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
        raise InvalidInputError("latents must be finite floating-point values")
    return arr.astype(np.float32)


@dataclass(frozen=True)
class Request:
    """A checked generation request (Pipeline._prepare's result)."""

    prompts: list[str]
    cfg: GenerationConfig  # resolved, per prompt
    whole: GenerationConfig  # num_images: the whole call's
    plan: MemoryPlan
    edit: EditInputs | None
    control: Any = None  # edge_sdk.controlnet.Control: the ControlNets at work, or None
    sources: dict[str, Any] = field(default_factory=dict)  # control images' sha256
