"""ControlNet inputs: the preprocessors that need no model (OpenCV), and the control image
prepared as diffusers' `StableDiffusionControlNetPipeline.prepare_image` prepares it.

A preprocessor turns a photo or drawing into what a ControlNet was trained on: `canny`
(white edges on black, OpenCV's Canny with two thresholds), `scribble` (white strokes on
black from a drawing: pixels darker than the threshold on a light page, or lighter on a dark
one) and `none` (the image is already a control map: an edge map, a depth map, a pose).
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidInputError
from .image_input import RESAMPLE, read_image

log = logging.getLogger(__name__)

__all__ = ["PREPROCESSORS", "ControlOptions", "preprocess", "canny", "scribble",
           "control_array"]

PREPROCESSORS = ("canny", "scribble", "none")
CANNY_LOW, CANNY_HIGH = 100, 200  # the thresholds of diffusers' and lllyasviel's examples
SCRIBBLE_THRESHOLD = 128  # gray level between a stroke and the page


@dataclass(frozen=True)
class ControlOptions:
    """How to preprocess one control image (the CLI's --control-preprocess & co.)."""

    preprocess: str = "none"
    low: int = CANNY_LOW
    high: int = CANNY_HIGH
    threshold: int = SCRIBBLE_THRESHOLD


def _gray(image: Any, what: str) -> np.ndarray:
    import cv2  # here, not at import: OpenCV costs 16 MiB of RSS to every pipeline
    rgb = np.asarray(read_image(image, what).image)
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _level(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not 0 <= value <= 255:
        raise InvalidInputError(f"{name} must be a whole gray level in 0..255, got {value!r}")
    return int(value)


def _three(channel: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(channel[..., None], 3, axis=2), mode="RGB")


def canny(image: Any, low: int = CANNY_LOW, high: int = CANNY_HIGH,
          what: str = "control_image") -> Image.Image:
    """White edges on black (RGB, the image's size): OpenCV's Canny on the RGB image, as the
    ControlNet authors' annotator and diffusers' examples call it (the strongest channel's
    gradient, so an edge between two colours of one brightness is found too; on the gray
    image a red disc on green, 25 gray levels apart, has none)."""
    import cv2
    if not _level("Canny's low threshold", low) <= _level("Canny's high threshold", high):
        raise InvalidInputError(f"Canny thresholds must satisfy 0 <= low <= high, got low={low}"
                                f" high={high}; try --canny-low 100 --canny-high 200")
    rgb = np.ascontiguousarray(np.asarray(read_image(image, what).image))
    return _three(cv2.Canny(rgb, low, high))


def scribble(image: Any, threshold: int = SCRIBBLE_THRESHOLD,
             what: str = "control_image") -> Image.Image:
    """White strokes on black from a drawing: on a light page (median gray above the
    threshold) the dark pixels are strokes, on a dark page the light ones."""
    if not 0 < _level("the scribble threshold", threshold) < 255:
        raise InvalidInputError(f"scribble threshold must be in 1..254, got {threshold}")
    gray = _gray(image, what)
    light_page = float(np.median(gray)) > threshold
    strokes = gray < threshold if light_page else gray > threshold
    return _three(np.where(strokes, 255, 0).astype(np.uint8))


def preprocess(image: Any, options: ControlOptions | str = "none",
               what: str = "control_image") -> Image.Image:
    """The control map of `image` by the named preprocessor (PREPROCESSORS)."""
    opts = ControlOptions(options) if isinstance(options, str) else options
    if not isinstance(opts, ControlOptions):
        raise InvalidInputError(f"preprocess options must be a name ({', '.join(PREPROCESSORS)})"
                                f" or a ControlOptions, got {type(options).__name__}")
    if opts.preprocess not in PREPROCESSORS:
        raise InvalidInputError(f"unknown control preprocessor {opts.preprocess!r}; choose "
                                f"one of {', '.join(PREPROCESSORS)}")
    if opts.preprocess == "canny":
        return canny(image, opts.low, opts.high, what)
    if opts.preprocess == "scribble":
        return scribble(image, opts.threshold, what)
    return read_image(image, what).image


def control_array(img: Image.Image, width: int, height: int,
                  what: str = "control_image") -> np.ndarray:
    """[1, 3, height, width] float32 in [0, 1] of an RGB image: as diffusers' control image
    processor (VaeImageProcessor without normalization), resized with PIL's Lanczos to the
    generation's size when it differs (a control image of another size is resized, with
    its aspect ratio changed if it differs, as diffusers does)."""
    if img.size != (width, height):
        log.info("%s %dx%d resized to %dx%d", what, img.width, img.height, width, height)
        img = img.resize((width, height), resample=RESAMPLE)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[None])
