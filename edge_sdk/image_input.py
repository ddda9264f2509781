"""Images in: the source image and mask of img2img and inpainting, read and preprocessed as
diffusers' `load_image` and `VaeImageProcessor` do it.

What is converted and what is refused follows diffusers, so an input that works there works
here and gives the same pixels: a *file* is read as `load_image` reads it (EXIF orientation
applied, any mode converted to RGB; a 16-bit grayscale file is scaled to 8 bits, where PIL's
conversion, which load_image uses, would clip it to white); an in-memory PIL image must
already be RGB (diffusers feeds its channels to the VAE as they are, and fails on 1 or 4); a
mask in any mode is made grayscale. Float images (PIL mode F) are refused. Resizing is PIL's
Lanczos, masks are binarized at 0.5.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidInputError

log = logging.getLogger(__name__)

__all__ = ["ImageSource", "SourceImage", "read_image", "read_mask", "decoded", "default_size",
           "crop_region", "resize", "image_array", "mask_array", "overlay"]

ImageSource = Union[str, Path, Image.Image, np.ndarray]
RESAMPLE = Image.Resampling.LANCZOS  # VaeImageProcessor's default `resample`
SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # 16-bit grayscale (PNG, TIFF)
WIDE_MODES = SIXTEEN_BIT + ("F",)  # more than 8 bits a channel
MASK_THRESHOLD = 0.5  # VaeImageProcessor.binarize: >= 0.5 is repainted


@dataclass(frozen=True)
class SourceImage:
    """An image read for editing, with the sha256 the result's metadata records (of the
    file's bytes for a path; of the RGB or grayscale pixels otherwise)."""

    image: Image.Image
    sha256: str


def read_image(source: Any, what: str = "image") -> SourceImage:
    """The RGB image of a path, a PIL RGB image or an HxWx3 array (uint8, or floats in
    [0, 1], rounded to 8 bits)."""
    if isinstance(source, (str, Path)):
        img, digest = _read_file(source, what)
        if img.mode != "RGB":
            if "A" in img.mode:
                log.info("%s %s: its alpha channel is dropped (as diffusers' load_image does)",
                         what, source)
            img = img.convert("RGB")
        return SourceImage(img, digest)
    if isinstance(source, Image.Image):
        _check_depth(source, what)
        if source.mode != "RGB":
            raise InvalidInputError(f"{what} is a {source.mode} PIL image; give an RGB one "
                                    f"({what}.convert('RGB')) or its file path")
        return SourceImage(source, _pixels_sha(source))
    if isinstance(source, np.ndarray):
        arr = _uint8(source, what)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise InvalidInputError(f"{what} array has shape {arr.shape}; give HxWx3 RGB "
                                    "(drop an alpha channel, stack a gray one)")
        img = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
        return SourceImage(img, _pixels_sha(img))
    raise InvalidInputError(f"{what} must be a file path, a PIL image or an HxWx3 array, "
                            f"got {type(source).__name__}")


def read_mask(source: Any) -> SourceImage:
    """A mask (white = repaint) of a path, a PIL image or an HxW / HxWx1 array, kept in its
    own mode until it is resized (diffusers makes it grayscale after resizing)."""
    what = "mask_image"
    if isinstance(source, (str, Path)):
        img, digest = _read_file(source, what)
        return SourceImage(img.convert("RGB"), digest)  # load_image's conversion
    if isinstance(source, Image.Image):
        _check_depth(source, what)
        keep = source.mode in ("L", "RGB", "RGBA", "LA")  # resized as they are, like diffusers
        return SourceImage(source if keep else source.convert("RGB"), _pixels_sha(source))
    if isinstance(source, np.ndarray):
        arr = (source * np.uint8(255)) if source.dtype == bool else _uint8(source, what)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim != 2:
            raise InvalidInputError(f"mask_image array has shape {arr.shape}; give HxW "
                                    "(white = repaint)")
        img = Image.fromarray(np.ascontiguousarray(arr), mode="L")
        return SourceImage(img, _pixels_sha(img))
    raise InvalidInputError(f"mask_image must be a file path, a PIL image or an HxW array, "
                            f"got {type(source).__name__}")


def default_size(image: Image.Image, multiple: int) -> tuple[int, int]:
    """(width, height): the image's, rounded down to `multiple` (diffusers rounds to the VAE
    factor; a bundle whose UNet needs more asks for its own multiple)."""
    w, h = (side - side % multiple for side in image.size)
    if w < multiple or h < multiple:
        raise InvalidInputError(f"the image is {image.width}x{image.height}: smaller than "
                                f"{multiple} pixels a side, the least this model takes")
    return w, h


def crop_region(mask: Image.Image, width: int, height: int, pad: int) -> tuple[int, int, int,
                                                                             int]:
    """diffusers' `get_crop_region`: the box (x1, y1, x2, y2) around every nonzero mask
    pixel, `pad` pixels wider each side, grown to the aspect ratio of width x height and
    kept inside the image."""
    m = np.asarray(mask.convert("L"))
    if not m.any():
        raise InvalidInputError("padding_mask_crop needs a mask with something to repaint; "
                                "this mask is black everywhere")
    cols, rows = np.flatnonzero(m.any(axis=0)), np.flatnonzero(m.any(axis=1))
    h, w = m.shape
    x1, y1 = max(int(cols[0]) - pad, 0), max(int(rows[0]) - pad, 0)
    x2, y2 = min(int(cols[-1]) + 1 + pad, w), min(int(rows[-1]) + 1 + pad, h)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(a: int, b: int, diff: int, limit: int) -> tuple[int, int]:
    """[a, b) grown by `diff` (half each side), shifted back inside [0, limit)."""
    a, b = a - diff // 2, b + diff - diff // 2
    if b >= limit:
        a, b = a - (b - limit), limit
    if a < 0:
        a, b = 0, b - a
    return a, min(b, limit)


def resize(image: Image.Image, width: int, height: int, mode: str = "default") -> Image.Image:
    """VaeImageProcessor.resize: "default" stretches to width x height; "fill" fits inside
    and fills the borders by stretching the edge rows or columns; "crop" fills and crops."""
    if mode == "default":
        return image.resize((width, height), resample=RESAMPLE)
    ratio, src_ratio = width / height, image.width / image.height
    fill = mode == "fill"
    wide = ratio < src_ratio if fill else ratio > src_ratio
    src_w = width if wide else image.width * height // image.height
    src_h = height if not wide else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=RESAMPLE)
    out = Image.new(resized.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if fill:
        _fill_borders(out, resized, ratio, src_ratio)
    return out


def _fill_borders(out: Image.Image, resized: Image.Image, ratio: float,
                  src_ratio: float) -> None:
    width, height, src_w, src_h = out.width, out.height, resized.width, resized.height
    if ratio < src_ratio and height // 2 - src_h // 2 > 0:
        fh = height // 2 - src_h // 2
        out.paste(resized.resize((width, fh), box=(0, 0, width, 0)), box=(0, 0))
        out.paste(resized.resize((width, fh), box=(0, src_h, width, src_h)),
                  box=(0, fh + src_h))
    elif ratio > src_ratio and width // 2 - src_w // 2 > 0:
        fw = width // 2 - src_w // 2
        out.paste(resized.resize((fw, height), box=(0, 0, 0, height)), box=(0, 0))
        out.paste(resized.resize((fw, height), box=(src_w, 0, src_w, height)),
                  box=(fw + src_w, 0))


def image_array(image: Image.Image) -> np.ndarray:
    """An RGB image -> [1, H, W, 3] float32 in [0, 1]."""
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


def mask_array(mask: Image.Image) -> np.ndarray:
    """A resized mask -> [1, 1, H, W] float32, 1 where it repaints (gray >= 0.5)."""
    gray = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (gray >= MASK_THRESHOLD).astype(np.float32)[None, None]


def overlay(mask: Image.Image, original: Image.Image, image: Image.Image,
            crop: tuple[int, int, int, int] | None = None) -> Image.Image:
    """diffusers' `apply_overlay`: the original's pixels where the mask is black, over the
    generated image (first resized into the crop box, when there is one)."""
    kept = Image.new("RGBa", original.size)
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    if crop is not None:
        x, y, x2, y2 = crop
        base = Image.new("RGBA", original.size)
        base.paste(resize(image, x2 - x, y2 - y, mode="crop"), (x, y))
        image = base.convert("RGB")
    out = image.convert("RGBA")
    out.alpha_composite(kept.convert("RGBA"))
    return out.convert("RGB")


def _read_file(path: str | Path, what: str) -> tuple[Image.Image, str]:
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"{what} file {str(p)!r} does not exist" if not p.exists()
                                else f"{what} {str(p)!r} is not a file")
    try:
        data = p.read_bytes()
        with Image.open(p) as img:
            return decoded(img, what), hashlib.sha256(data).hexdigest()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError,
            SyntaxError) as exc:
        raise InvalidInputError(f"{what} {str(p)!r} is not a readable image: {exc}") from exc


def decoded(img: Image.Image, what: str) -> Image.Image:
    """An opened image file's pixels as load_image reads them: decoded, a 16-bit grayscale
    one scaled to 8 bits, other wide modes refused, its EXIF orientation applied. (PIL's
    errors on damaged data pass through.)"""
    img.load()
    if img.mode in SIXTEEN_BIT:
        log.info("%s is 16-bit: scaled to 8 bits", what)
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round()
                              .clip(0, 255).astype(np.uint8), mode="L")
    _check_depth(img, what)
    return ImageOps.exif_transpose(img)


def _check_depth(img: Image.Image, what: str) -> None:
    if img.mode in WIDE_MODES:
        raise InvalidInputError(f"{what} is a {img.mode} image (16-bit or float); give an "
                                "8-bit one (a 16-bit grayscale file is read; in memory, "
                                "convert it yourself: reducing it here would clip it)")


def _uint8(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min(initial=0) < 0 or arr.max(initial=0) > 1:
            raise InvalidInputError(f"a float {what} array must hold finite values in [0, 1]")
        return (arr * 255).round().astype(np.uint8)
    raise InvalidInputError(f"{what} array is {arr.dtype}; give uint8 (0-255) or floats in "
                            "[0, 1] (16-bit images: convert to 8 bits first)")


def _pixels_sha(img: Image.Image) -> str:
    return hashlib.sha256(img.tobytes()).hexdigest()
