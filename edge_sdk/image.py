"""Images out: float arrays -> PIL images, and PNG files that carry their parameters."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import InvalidInputError


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> PIL RGB images (rounded like diffusers)."""
    data = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(x, mode="RGB") for x in data]


def save_png(image: Image.Image, path: str | Path, parameters: Mapping[str, Any]) -> Path:
    """Write `image` to `path` with the generation parameters as PNG text chunks.

    Written to a temporary file and renamed, so an existing file is never half-overwritten.
    """
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", json.dumps(dict(parameters), ensure_ascii=False))
    for key in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler"):
        if parameters.get(key) is not None:
            info.add_text(key, str(parameters[key]))
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInputError(f"output folder {str(parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
