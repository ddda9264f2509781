"""Images out: float arrays -> PIL images, and image files that carry their parameters."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import InvalidInputError

# file suffix -> PIL format; PNG carries the parameters as text chunks, JPEG as a comment
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
JPEG_QUALITY = 95


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[B, H, W, 3] floats in [0, 1] -> PIL RGB images (rounded like diffusers)."""
    data = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(x, mode="RGB") for x in data]


def check_output_path(path: str | Path, suffixes: Mapping[str, str] = FORMATS) -> Path:
    """Refuse, before any work, an output path that cannot be written: an existing folder,
    a missing or unwritable parent folder, an unknown suffix."""
    path = Path(path)
    if not path.name:
        raise InvalidInputError("the output path is empty; give a file name such as out.png")
    if path.is_dir():
        raise InvalidInputError(f"{str(path)!r} is a folder; give a file path inside it, such "
                                f"as {str(path / ('out' + min(suffixes)))!r}")
    if path.suffix.lower() not in suffixes:
        raise InvalidInputError(f"{str(path)!r}: unknown file type {path.suffix!r}; use one "
                                f"of {sorted(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InvalidInputError(f"output folder {str(parent)!r} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidInputError(f"output folder {str(parent)!r} is not writable; choose another")
    return path


def save_png(image: Image.Image, path: str | Path, parameters: Mapping[str, Any]) -> Path:
    """Write `image` to `path` (PNG, or JPEG for .jpg/.jpeg) with the generation parameters
    in it. Written to a temporary file and renamed, so an existing file is never
    half-overwritten; the file gets the permissions of the process's umask, like any file
    the user writes."""
    path = check_output_path(path)
    fmt = FORMATS[path.suffix.lower()]
    text = json.dumps(dict(parameters), ensure_ascii=False)
    options: dict[str, Any] = {"format": fmt}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        for key in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler",
                    "strength", "image_sha256", "mask_sha256"):
            if parameters.get(key) is not None:
                info.add_text(key, str(parameters[key]))
        options["pnginfo"] = info
    else:
        comment = text.encode("utf-8")  # a JPEG comment segment holds at most 65,533 bytes
        options.update(quality=JPEG_QUALITY, comment=comment if len(comment) < 65_000 else
                       json.dumps({"seed": parameters.get("seed")}).encode())
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise InvalidInputError(f"cannot write into {str(parent)!r}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, **options)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (setting and
    restoring it would race with files other threads create meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
