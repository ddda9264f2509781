"""Images over HTTP: base64 or uploaded bytes in, base64 PNG out.

An incoming image's size is read from its header and refused over the limit before any
pixel is decoded (a 100-byte PNG can claim 20000x20000). URLs are never fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from ..errors import InvalidInputError, RequestTooLargeError
from ..image_input import decoded

FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what a client may send; never a PDF, EPS or SVG


def decode_b64(data: Any, what: str, max_pixels: int) -> Image.Image:
    """A base64 image (A1111: plain or a data: URL) -> a PIL image, its header checked."""
    if not isinstance(data, str):
        raise InvalidInputError(f"{what} must be a base64 string, got {type(data).__name__}")
    if data.startswith(("http://", "https://")):
        raise InvalidInputError(f"{what} is a URL; this server does not fetch URLs: send the "
                                "image itself, base64-encoded")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInputError(f"{what} is not valid base64: {exc}") from exc
    return decode_bytes(raw, what, max_pixels)


def decode_bytes(raw: bytes, what: str, max_pixels: int) -> Image.Image:
    """Image file bytes -> a loaded PIL image (EXIF orientation applied), refused over
    `max_pixels` from the header alone."""
    try:
        img = Image.open(io.BytesIO(raw), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # PIL's own bound, from the header too
        raise RequestTooLargeError(f"{what}: {exc}; this server takes at most "
                                   f"{max_pixels:,} pixels (--max-image-pixels)") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidInputError(f"{what} is not a PNG, JPEG, WebP or BMP image") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise RequestTooLargeError(f"{what} is {width}x{height}: over this server's limit of "
                                   f"{max_pixels:,} pixels (--max-image-pixels); send it "
                                   "smaller")
    try:
        return decoded(img, what)  # as a file given to the pipeline is read
    except InvalidInputError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(f"{what} could not be decoded: {exc}") from exc


def rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def encode_png(img: Image.Image, infotext: str | None = None) -> str:
    """A PNG as base64, with A1111's `parameters` text chunk when `infotext` is given."""
    buf = io.BytesIO()
    info = None
    if infotext is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", infotext)
    img.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")
