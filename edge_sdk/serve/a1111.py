"""AUTOMATIC1111's web UI API (`/sdapi/v1/*`), for what this runtime does.

Fields keep A1111's names and meanings. What a field asks for that edge-sdk does not do
(hires fix, face restoration, tiling, variation seeds, scripts, styles, other resize modes)
is refused with a 422 naming the field, unless it has its "off" value (or null), as clients
such as webuiapi send by default; fields with no bearing here (eta, s_churn, save_images,
inpainting_fill: the masked area always starts from the source) and unknown ones are
ignored, as A1111's own API ignores unknown fields. Differences: an omitted sampler_name,
steps or cfg_scale is the model's own (A1111: its defaults); an omitted width/height the
model's size, or the source's for img2img (A1111: 512); a model in override_settings is for
that request only; an interrupted generation returns the image of its latents at that step,
as A1111 does (none for an inpainting of a cropped region).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

from PIL import Image, ImageFilter, ImageOps
from starlette.requests import Request

from .. import __version__
from ..config import GenerationConfig
from ..errors import InvalidInputError, SchedulerError
from . import fields as F
from .app import Server, generate, run_job
from .images import decode_b64, encode_png, rgb
from .worker import Job

# A1111 sampler -> (our scheduler, A1111 aliases); with A1111 >= 1.9's separate `scheduler`
# field, "Karras" turns DPM++ 2M into its Karras variant
SAMPLERS: dict[str, tuple[str, list[str]]] = {
    "Euler a": ("euler_a", ["k_euler_a", "k_euler_ancestral"]),
    "Euler": ("euler", ["k_euler"]),
    "DPM++ 2M": ("dpmpp_2m", ["k_dpmpp_2m"]),
    "DPM++ 2M Karras": ("dpmpp_2m_karras", ["k_dpmpp_2m_ka"]),
    "DDIM": ("ddim", []),
    "PLMS": ("pndm", []),
    "LCM": ("lcm", ["k_lcm"]),
}
KARRAS = {"dpmpp_2m": "dpmpp_2m_karras"}
# a model's own scheduler (a diffusers class) by A1111's name
CLASS_SAMPLERS = {"EulerAncestralDiscreteScheduler": "Euler a", "EulerDiscreteScheduler": "Euler",
                  "DPMSolverMultistepScheduler": "DPM++ 2M", "DDIMScheduler": "DDIM",
                  "PNDMScheduler": "PLMS", "LCMScheduler": "LCM"}
AUTOMATIC = ("", "automatic")  # A1111's `scheduler` that keeps the sampler's own schedule
# a field -> its "off" values: anything else asks for what edge-sdk does not do
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "enable_hr": (False,), "restore_faces": (False,), "tiling": (False,),
    "subseed_strength": (0, 0.0), "script_name": ("", None), "styles": ([],),
    "refiner_checkpoint": ("", None, "None"), "firstpass_image": ("", None),
    "resize_mode": (0,), "image_cfg_scale": None,  # None: any value (pix2pix only)
}
MAX_BATCH = 100  # A1111's own bound of batch_size and n_iter
SIZE_MULTIPLE = 8  # A1111 rounds width and height down to a multiple of 8
MAX_CLIP_STOP = 12  # CLIP_stop_at_last_layers: A1111's slider's range, 1-12
MASK_BLUR, MAX_MASK_BLUR = 4, 64  # A1111's default mask_blur; ours bounds its cost
FULL_RES_PADDING, MAX_PADDING = 32, 4096  # A1111's default inpaint_full_res_padding
MAX_PREVIEW_EVERY = 1000


def sampler_scheduler(body: dict[str, Any]) -> str | None:
    """Our scheduler for A1111's sampler_name (or sampler_index) and scheduler; None = the
    model's own."""
    name = F.get_str(body, "sampler_name") or F.get_str(body, "sampler_index")
    schedule = (F.get_str(body, "scheduler") or "").strip().lower()
    if not name:
        return None
    ours = next((ours for key, (ours, aliases) in SAMPLERS.items()
                 if name.lower() in [key.lower()] + aliases), None)
    if ours is None:
        raise SchedulerError(f"Sampler not found: {name[:80]!r}; this server has "
                             f"{list(SAMPLERS)} (GET /sdapi/v1/samplers)")
    if schedule in AUTOMATIC:
        return ours
    if schedule == "karras" and (ours in KARRAS or ours in KARRAS.values()):
        return KARRAS.get(ours, ours)
    raise SchedulerError(f"scheduler {schedule!r} with sampler {name!r} is not available "
                         "here; use 'Automatic' (or 'Karras' with DPM++ 2M)")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name, off in UNSUPPORTED.items():
        # (null is "off" too: A1111 >= 1.6 sends restore_faces and tiling as null)
        if off is not None and body.get(name) is not None and body[name] not in off:
            raise InvalidInputError(f"{name}={body[name]!r}: edge-sdk does not do this; leave "
                                    f"{name} at {off[0]!r}")
    for script, spec in F.get_dict(body, "alwayson_scripts").items():
        args = spec.get("args", []) if isinstance(spec, dict) else spec
        if args not in ([], [False], None):  # a disabled extension, as webuiapi sends it
            raise InvalidInputError(f"alwayson_scripts {script!r}: edge-sdk runs no scripts "
                                    "or extensions")


def _config(server: Server, body: dict[str, Any], override: dict[str, Any]) -> GenerationConfig:
    n = F.get_int(body, "batch_size", 1, lo=1, hi=MAX_BATCH) * \
        F.get_int(body, "n_iter", 1, lo=1, hi=MAX_BATCH)
    seed = F.get_int(body, "seed", -1, lo=-1)
    clip = F.get_int(override, "CLIP_stop_at_last_layers",
                     server.options["CLIP_stop_at_last_layers"], lo=1, hi=MAX_CLIP_STOP)
    width, height = (F.get_int(body, side, lo=SIZE_MULTIPLE) for side in ("width", "height"))
    return GenerationConfig(
        negative_prompt=F.get_str(body, "negative_prompt") or None,
        steps=F.get_int(body, "steps", lo=1), seed=None if seed == -1 else seed,
        guidance_scale=F.get_float(body, "cfg_scale", lo=0),
        width=width and width - width % SIZE_MULTIPLE,
        height=height and height - height % SIZE_MULTIPLE,
        scheduler=sampler_scheduler(body), num_images=n, clip_skip=clip - 1 or None)


def _job(server: Server, body: dict[str, Any]) -> Job:
    _refuse_unsupported(body)
    override = F.get_dict(body, "override_settings")
    name = override.get("sd_model_checkpoint")
    # a model named here is for this request only (A1111's default restores its settings
    # afterwards); None: the selected one (POST /sdapi/v1/options) when the job runs
    model = server.registry.get(name) if name is not None else None
    F.get_bool(body, "send_images", True)  # (checked now, used in the response)
    every = int(server.options["show_progress_every_n_steps"])
    return Job(model, F.get_str(body, "prompt", ""), _config(server, body, override),
               preview_every=max(0, every))


async def txt2img(server: Server, request: Request, body: dict[str, Any]) -> dict[str, Any]:
    job = await generate(server, request, _job(server, body))
    return await server.encode(_response, server, job, body)


async def img2img(server: Server, request: Request, body: dict[str, Any]) -> dict[str, Any]:
    job = _job(server, body)
    images = F.get_list(body, "init_images")
    if len(images) != 1:
        raise InvalidInputError(f"init_images holds {len(images)} images; send exactly one "
                                "(base64)")
    strength = F.get_float(body, "denoising_strength", 0.75, lo=0, hi=1)
    padding, invert = None, F.get_bool(body, "inpainting_mask_invert")
    blur = F.get_int(body, "mask_blur", MASK_BLUR, lo=0, hi=MAX_MASK_BLUR)
    if body.get("mask") is not None and F.get_bool(body, "inpaint_full_res", True):
        padding = F.get_int(body, "inpaint_full_res_padding", FULL_RES_PADDING, lo=0,
                            hi=MAX_PADDING)  # A1111's "only masked"
    job.image, job.mask = await server.decode(_read_images, images[0], body.get("mask"),
                                              invert, blur, server.limits.max_image_pixels)
    job.config = replace(job.config, strength=strength, padding_mask_crop=padding)
    job = await generate(server, request, job)
    return await server.encode(_response, server, job, body, strength)


def _read_images(image: Any, mask: Any, invert: bool, blur: int, pixels: int
                 ) -> tuple[Image.Image, Image.Image | None]:
    """The source image (RGB) and the mask as the pipeline takes it (white = repaint:
    inverted if asked, blurred by mask_blur, as A1111 does before its own use of it)."""
    source = rgb(decode_b64(image, "init_images[0]", pixels))
    if mask is None:
        return source, None
    gray = decode_b64(mask, "mask", pixels).convert("L")
    if invert:
        gray = ImageOps.invert(gray)
    return source, gray.filter(ImageFilter.GaussianBlur(blur)) if blur else gray


def _response(server: Server, job: Job, body: dict[str, Any],
              strength: float | None = None) -> dict[str, Any]:
    result, images = job.result, job.images
    cfg = result.config if result is not None else job.config
    seeds = result.seeds if result is not None else \
        [int(cfg.seed or 0) + k for k in range(len(images))]
    sampler = F.get_str(body, "sampler_name") or _sampler_name(cfg)
    texts = [_infotext(job, cfg, sampler, s, strength) for s in seeds]
    send = F.get_bool(body, "send_images", True)
    info = {"prompt": job.prompt, "all_prompts": [job.prompt] * len(images),
            "negative_prompt": cfg.negative_prompt or "", "seed": seeds[0] if seeds else -1,
            "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0, "width": cfg.width, "height": cfg.height,
            "sampler_name": sampler, "cfg_scale": cfg.guidance_scale, "steps": cfg.steps,
            "batch_size": len(images), "restore_faces": False,
            "sd_model_name": job.model.name, "sd_model_hash": job.model.short_hash,
            "denoising_strength": strength, "clip_skip": int(cfg.clip_skip or 0) + 1,
            "infotexts": texts, "styles": [], "interrupted": job.cancel == "interrupted",
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": f"edge-sdk {__version__}"}
    echo = {k: v for k, v in body.items() if k not in ("init_images", "mask")}
    return {"images": [encode_png(im, t) for im, t in zip(images, texts)] if send else [],
            "parameters": echo, "info": json.dumps(info)}


def _sampler_name(cfg: GenerationConfig) -> str:
    """A1111's name of the scheduler a generation used (its own name when A1111 has none)."""
    ours = str(cfg.scheduler)
    return next((k for k, (v, _) in SAMPLERS.items() if v == ours), None) or \
        CLASS_SAMPLERS.get(ours, ours)


def _infotext(job: Job, cfg: GenerationConfig, sampler: str, seed: int,
              strength: float | None) -> str:
    """A1111's generation parameters text (its PNG `parameters` chunk)."""
    karras = str(cfg.scheduler).endswith("_karras")
    items = [("Steps", cfg.steps), ("Sampler", sampler.removesuffix(" Karras")),
             ("Schedule type", "Karras" if karras else None),
             ("CFG scale", cfg.guidance_scale),
             ("Seed", seed), ("Size", f"{cfg.width}x{cfg.height}"),
             ("Model hash", job.model.short_hash), ("Model", job.model.name),
             ("Denoising strength", strength),
             ("Clip skip", int(cfg.clip_skip or 0) + 1 if cfg.clip_skip else None),
             ("Version", f"edge-sdk {__version__}")]
    text = job.prompt or ""
    if cfg.negative_prompt:
        text += f"\nNegative prompt: {cfg.negative_prompt}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in items if v is not None)


async def progress(server: Server, request: Request, _: Any) -> dict[str, Any]:
    """The running generation's progress, its ETA and (unless skip_current_image) its
    latest live preview; the A1111 shape, zeros when idle."""
    job, queued = server.worker.running, server.worker.queued
    skip_image = request.query_params.get("skip_current_image", "false").lower() == "true"
    done = job.step / job.total if job is not None and job.total else 0.0
    elapsed = time.monotonic() - job.started if job is not None and job.started else 0.0
    eta = elapsed / done - elapsed if done > 0 else None
    preview = job.preview if job is not None and not skip_image else None  # (base64)
    return {"progress": round(done, 4), "eta_relative": round(eta, 2) if eta else 0.0,
            "state": {"skipped": False, "interrupted": job is not None and
                      job.cancel == "interrupted", "stopping_generation": False,
                      "job": f"job {job.id}" if job else "", "job_count": queued + bool(job),
                      "job_timestamp": "0", "job_no": 0,
                      "sampling_step": job.step if job else 0,
                      "sampling_steps": job.total if job else 0},
            "current_image": preview,
            "textinfo": None, "current_task": f"task({job.id})" if job else None}


async def interrupt(server: Server, request: Request, _: Any) -> dict[str, Any]:
    server.worker.interrupt()
    return {}


async def sd_models(server: Server, request: Request, _: Any) -> list[dict[str, Any]]:
    return [{"title": e.title, "model_name": e.name, "hash": e.short_hash[:8],
             "sha256": e.sha256, "filename": str(e.path), "config": None}
            for e in server.registry.entries.values()]


async def samplers(server: Server, request: Request, _: Any) -> list[dict[str, Any]]:
    return [{"name": name, "aliases": aliases, "options": {"scheduler": ours}}
            for name, (ours, aliases) in SAMPLERS.items()]


async def schedulers(server: Server, request: Request, _: Any) -> list[dict[str, Any]]:
    return [{"name": "automatic", "label": "Automatic", "aliases": None,
             "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
             "need_inner_model": False}]


async def scripts(server: Server, request: Request, _: Any) -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}  # webuiapi asks, to find extensions: none here


async def get_options(server: Server, request: Request, _: Any) -> dict[str, Any]:
    model = server.worker.selected
    return {**server.options, "sd_model_checkpoint": model.title if model else None,
            "sd_checkpoint_hash": model.sha256 if model else None, "samples_format": "png",
            "live_previews_enable": server.options["show_progress_every_n_steps"] > 0}


async def set_options(server: Server, request: Request, body: dict[str, Any]) -> None:
    """The settings a client may change: the model (loaded now, in the worker's turn), the
    live-preview interval and the clip skip. Other A1111 settings are ignored."""
    every = F.get_int(body, "show_progress_every_n_steps", lo=-1, hi=MAX_PREVIEW_EVERY)
    clip = F.get_int(body, "CLIP_stop_at_last_layers", lo=1, hi=MAX_CLIP_STOP)
    if body.get("sd_model_checkpoint") is not None:
        entry = server.registry.get(body["sd_model_checkpoint"])
        if entry != server.worker.selected or entry != server.worker.model:
            await run_job(server, request, Job(entry))
    if every is not None:
        server.options["show_progress_every_n_steps"] = every
    if clip is not None:
        server.options["CLIP_stop_at_last_layers"] = clip
    return None


ROUTES = [(f"/sdapi/v1/{path}", [method], handler, "a1111", body)
          for path, method, handler, body in (
              ("txt2img", "POST", txt2img, "json"), ("img2img", "POST", img2img, "json"),
              ("progress", "GET", progress, None), ("interrupt", "POST", interrupt, None),
              ("sd-models", "GET", sd_models, None), ("samplers", "GET", samplers, None),
              ("schedulers", "GET", schedulers, None), ("scripts", "GET", scripts, None),
              ("options", "GET", get_options, None), ("options", "POST", set_options, "json"))]
