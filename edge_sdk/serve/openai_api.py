"""OpenAI's Images API (`/v1/images/generations`, `/v1/images/edits`) and `/v1/models`.

`model` is a bundle's name (GET /v1/models); omitted, the loaded model. `size` is "WxH" or
"auto" (omitted: the model's native size). Images come back as `b64_json`; `url` is refused
(this server keeps no files to link to). `quality`, `style`, `user` and `moderation` are
accepted and have no effect; `output_format` must be png and `background` not transparent.
Extensions, in the body (the openai client's `extra_body`): `seed`, `steps`,
`guidance_scale`, `negative_prompt`, `scheduler` (edge-sdk's names) and, for edits,
`strength`. A1111's prompt weighting applies, as in every generation.

An edit's mask follows OpenAI: its fully transparent pixels are repainted. A mask without
an alpha channel is read as A1111's (white = repaint). No mask: an image with transparent
pixels is inpainted there; an opaque one is img2img at `strength` (default 0.8).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Mapping

from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request

from ..config import GenerationConfig
from ..errors import InvalidInputError
from . import fields as F
from .app import Server, generate
from .images import decode_bytes, encode_png, rgb
from .worker import Job

MAX_N = 10  # OpenAI's bound of n
MAX_WORD, MAX_NAME = 40, 400  # lengths of an option's value, of a model or scheduler name
ALPHA_EDIT = 0  # OpenAI: alpha 0 marks the area to edit


def _size(body: Mapping[str, Any]) -> tuple[int | None, int | None]:
    size = F.get_str(body, "size", "auto", max_len=MAX_WORD)
    if size == "auto":
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not (w.isascii() and w.isdigit() and h.isascii() and h.isdigit()):
        raise InvalidInputError(f"size {size!r} is not WIDTHxHEIGHT (e.g. 512x512) or auto")
    return int(w), int(h)


def _check_format(body: Mapping[str, Any]) -> None:
    fmt = F.get_str(body, "response_format", "b64_json", max_len=MAX_WORD)
    if fmt == "url":
        raise InvalidInputError("response_format 'url' is not offered: this server keeps no "
                                "files to link to; use 'b64_json' (the default)")
    if fmt != "b64_json":
        raise InvalidInputError(f"response_format {fmt!r}: use 'b64_json'")
    if F.get_str(body, "output_format", "png", max_len=MAX_WORD) != "png":
        raise InvalidInputError("output_format: only 'png' is offered")
    if F.get_str(body, "background", "auto", max_len=MAX_WORD) == "transparent":
        raise InvalidInputError("background 'transparent' is not offered; use 'opaque'")


def _job(server: Server, body: Mapping[str, Any], text: bool = False) -> Job:
    _check_format(body)
    prompt = F.get_str(body, "prompt")
    if prompt is None:
        raise InvalidInputError("prompt is required")
    name = F.get_str(body, "model", max_len=MAX_NAME)
    model = server.registry.get(name) if name is not None else None  # None: the selected
    width, height = _size(body)
    cfg = GenerationConfig(
        num_images=F.get_int(body, "n", 1, lo=1, hi=MAX_N, text=text),
        width=width, height=height, seed=F.get_int(body, "seed", lo=0, text=text),
        steps=F.get_int(body, "steps", lo=1, text=text),
        guidance_scale=F.get_float(body, "guidance_scale", lo=0, text=text),
        negative_prompt=F.get_str(body, "negative_prompt") or None,
        scheduler=F.get_str(body, "scheduler", max_len=MAX_NAME))
    return Job(model, prompt, cfg)


async def generations(server: Server, request: Request, body: dict[str, Any]
                      ) -> dict[str, Any]:
    job = await generate(server, request, _job(server, body))
    return await server.encode(_response, job)


async def edits(server: Server, request: Request, form: FormData) -> dict[str, Any]:
    body = {k: v for k, v in form.multi_items() if not isinstance(v, UploadFile)}
    job = _job(server, body, text=True)
    uploads = [v for k, v in form.multi_items() if k in ("image", "image[]")
               and isinstance(v, UploadFile)]
    if len(uploads) != 1:
        raise InvalidInputError(f"send one image file (got {len(uploads)}); several images "
                                "per edit are not offered")
    mask_file = form.get("mask")
    mask = await mask_file.read() if isinstance(mask_file, UploadFile) else None
    strength = F.get_float(body, "strength", lo=0, hi=1, text=True)
    job.image, job.mask = await server.decode(_read_images, await uploads[0].read(), mask,
                                              server.limits.max_image_pixels)
    job.config = replace(job.config, strength=strength)
    job = await generate(server, request, job)
    return await server.encode(_response, job)


def _read_images(image: bytes, mask: bytes | None, pixels: int
                 ) -> tuple[Image.Image, Image.Image | None]:
    """The source (RGB) and the mask as the pipeline takes it (white = repaint): the mask
    file's, or the image's own transparent pixels, or none (img2img)."""
    source = _with_alpha(decode_bytes(image, "image", pixels))
    if mask is not None:
        return rgb(source), edit_mask(decode_bytes(mask, "mask", pixels))
    transparent = "A" in source.getbands() and \
        source.getchannel("A").getextrema()[0] == ALPHA_EDIT
    return rgb(source), edit_mask(source) if transparent else None


def edit_mask(mask: Image.Image) -> Image.Image:
    """OpenAI's mask (transparent = edit) as edge-sdk's (white = repaint); a mask with no
    alpha is taken as already white = repaint."""
    mask = _with_alpha(mask)
    if "A" in mask.getbands():
        return mask.getchannel("A").point(lambda a: 255 if a == ALPHA_EDIT else 0)
    return mask.convert("L")


def _with_alpha(image: Image.Image) -> Image.Image:
    """A palette image with a transparent colour as RGBA (its transparency as alpha)."""
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA")
    return image


def _response(job: Job) -> dict[str, Any]:
    return {"created": int(time.time()),
            "data": [{"b64_json": encode_png(im), "revised_prompt": job.prompt}
                     for im in job.images]}


async def models(server: Server, request: Request, _: Any) -> dict[str, Any]:
    return {"object": "list",
            "data": [{"id": e.name, "object": "model",
                      "created": int(e.path.stat().st_mtime), "owned_by": "edge-sdk"}
                     for e in server.registry.entries.values()]}


ROUTES = [("/v1/images/generations", ["POST"], generations, "openai", "json"),
          ("/v1/images/edits", ["POST"], edits, "openai", "form"),
          ("/v1/models", ["GET"], models, "openai", None)]
