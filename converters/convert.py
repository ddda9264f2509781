"""`convert()`: a diffusers checkpoint folder -> an edge-sdk bundle folder.

Components are exported one at a time and freed after export, so peak memory is that of the
largest component, not the whole pipeline.
"""

from __future__ import annotations

import datetime as _dt
import errno
import functools
import gc
import logging
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edge_sdk import names as N
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import (ComponentSpec, Defaults, Manifest, SourceInfo, UnetSpec,
                               VaeSpec)

from . import __version__
from .attention import VAE_AUTO_CHUNKS, auto_chunks, use_chunked_attention
from .bundle import AtomicBundle, file_entries, onnx_io, write_manifest
from .checkpoint import Checkpoint
from .export_onnx import DEFAULT_OPSET, finish_component, trace_fp32
from .export_tflite import export_tflite, parse_sizes, require_litert_torch, tflite_io
from .tokenizer import export_tokenizer

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
# AutoencoderKL's own default, used by diffusers when a VAE config.json omits scaling_factor
AUTOENCODER_KL_DEFAULT_SCALING = 0.18215


# A bare precision sets these components. The VAE is the sensitive part (its output is the
# image) and stays fp32 unless named (`--precision int8,vae=int8`); the text encoder is small
# and loses most to 4 bits, so a bare "int4" makes it int8.
_BARE: dict[str, dict[str, str]] = {
    "int8": {N.TEXT_ENCODER: "int8", N.UNET: "int8"},
    "int4": {N.TEXT_ENCODER: "int8", N.UNET: "int4"},
}


def parse_precision(spec: str) -> dict[str, str]:
    """`fp16` -> every component fp16; `int8` -> text encoder and UNet int8, VAE fp32;
    `int4` -> UNet int4, text encoder int8, VAE fp32; `unet=int4,vae=fp16` -> per component
    (`vae` means both VAE halves). Unnamed: fp32."""
    out = {c: "fp32" for c in N.COMPONENTS}
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, value = part.rpartition("=")
        if value not in N.PRECISIONS:
            raise ConversionError(f"precision {value!r} is not supported; choose one of "
                                  f"{list(N.PRECISIONS)}")
        if not name:
            out.update(_BARE.get(value, {c: value for c in N.COMPONENTS}))
            continue
        targets = [N.VAE_DECODER, N.VAE_ENCODER] if name == "vae" else [name]
        for t in targets:
            if t not in out:
                raise ConversionError(f"unknown component {t!r} in --precision; use "
                                      f"{list(N.COMPONENTS)} or 'vae'")
            out[t] = value
    return out


def _defaults(sched: dict[str, Any], size: int, steps: int | None,
              guidance: float | None) -> Defaults:
    # Distilled models (LCM, Turbo) want few steps and no classifier-free guidance.
    cls = sched.get("_class_name")
    if cls == "LCMScheduler":
        d_steps, d_guid = 4, 1.0
    elif cls == "EulerAncestralDiscreteScheduler" and sched.get("timestep_spacing") == "trailing":
        d_steps, d_guid = 1, 0.0  # SD-Turbo's configuration
    else:
        d_steps, d_guid = 25, 7.5
    return Defaults(steps=steps or d_steps,
                    guidance_scale=d_guid if guidance is None else guidance,
                    width=size, height=size)


def _storage_errors_reported(fn: Callable[..., Manifest]) -> Callable[..., Manifest]:
    """A full disk, a read-only or unwritable output, etc. become a ConversionError naming
    the cause and the path (AtomicBundle has already removed the partial bundle)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Manifest:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            hint = {errno.ENOSPC: "free some disk space or write the bundle elsewhere",
                    errno.EDQUOT: "free some disk quota or write the bundle elsewhere",
                    errno.EACCES: "choose an output folder you can write to",
                    errno.EPERM: "choose an output folder you can write to",
                    errno.EROFS: "the filesystem is read-only; write the bundle elsewhere"}
            where = f" ({exc.filename})" if exc.filename else ""
            raise ConversionError(
                f"writing the bundle failed: {exc.strerror or exc}{where}; "
                f"{hint.get(exc.errno, 'check the output location')}. Nothing was left "
                "behind; an existing bundle there is unchanged") from exc
    return wrapper


@_storage_errors_reported
def convert(checkpoint: str | Path, output: str | Path, *, fmt: str = "onnx",
            precision: str = "fp32", overwrite: bool = False, allow_pickle: bool = False,
            opset: int = DEFAULT_OPSET, default_steps: int | None = None,
            default_guidance: float | None = None, vae_encoder: bool = True,
            int8_method: str = "dynamic", calibration: str | Path | None = None,
            vae_stages: bool = False, attention_chunks: int | str = "auto",
            sizes: str | None = None, name: str | None = None,
            progress: Progress | None = None,
            static_unet: Callable[[Path], list[str]] | None = None) -> Manifest:
    """Convert `checkpoint` into a bundle at `output` and return its manifest.

    `int8_method="static"` makes an int8 UNet static QDQ, calibrated on denoising
    trajectories of the prompts in `calibration` (one per line; a built-in set if None).
    `attention_chunks`: the UNet's self-attention in that many query slices in the graph
    (bounded attention memory) and the VAE's mid-block attention likewise; "auto" slices
    UNets whose native size has >= 2,048 tokens, and the VAE always (it decodes at the
    output size, often beyond the native one). `fmt="tflite"`: .tflite components with
    static shapes, the UNet and VAE for each of `sizes` ("512x512,512x768"; default: the
    native size); `vae_stages` then adds ONNX decoder stages (a mixed bundle). `name`: the
    model's name in the manifest (`source.name`; default: the checkpoint folder's name)."""
    say = progress or (lambda msg: log.info("%s", msg))
    if fmt not in N.BACKEND_FORMATS:
        raise ConversionError(f"format {fmt!r} is not supported; use one of "
                              f"{list(N.BACKEND_FORMATS)}")
    if fmt == "tflite":
        require_litert_torch()
        if int8_method == "static":
            raise ConversionError("static int8 is ONNX-only; TFLite int8 is dynamic "
                                  "(drop --int8-method static)")
    elif sizes:
        raise ConversionError("--sizes is for --format tflite (ONNX graphs take any size)")
    if int8_method not in ("dynamic", "static"):
        raise ConversionError(f"int8 method {int8_method!r} unknown; use dynamic or static")
    name = name.strip() if name is not None else None  # a shell's stray spaces are no name
    if name == "":
        raise ConversionError("--name must not be empty (leave it out to use the checkpoint "
                              "folder's name)")
    precisions = parse_precision(precision)
    if int8_method == "static" and precisions[N.UNET] == "int8" and static_unet is None:
        return _convert_static(checkpoint, output, precisions, calibration, say, locals())
    ckpt = Checkpoint.open(checkpoint, allow_pickle=allow_pickle)
    text_cfg = ckpt.config("text_encoder")
    chunks = _attention_chunks(attention_chunks, int(ckpt.config("unet")["sample_size"]))
    vae_chunks = VAE_AUTO_CHUNKS if attention_chunks == "auto" else chunks
    plan = [N.TEXT_ENCODER, N.UNET, N.VAE_DECODER] + ([N.VAE_ENCODER] if vae_encoder else [])
    unet_cfg = ckpt.config("unet")
    vae_factor = 2 ** (len(ckpt.config("vae")["block_out_channels"]) - 1)
    text_len = int(text_cfg.get("max_position_embeddings", 77))
    context_dim = _cross_dim(unet_cfg)
    tfl_sizes = parse_sizes(sizes, int(unet_cfg["sample_size"]) * vae_factor,
                            vae_factor * 2 ** (len(unet_cfg["block_out_channels"]) - 1))
    components: dict[str, ComponentSpec] = {}
    with AtomicBundle(output, overwrite=overwrite) as stage:
        vae = None
        for i, comp in enumerate(plan, 1):
            t0 = time.perf_counter()
            say(f"[{i}/{len(plan)}] {comp}: loading and exporting ({precisions[comp]})")
            if comp == N.UNET and static_unet is not None:
                model = None  # quantized from the calibrated fp32 graph, not re-exported
            elif comp == N.TEXT_ENCODER:
                model = ckpt.load_text_encoder()
            elif comp == N.UNET:
                model = ckpt.load_unet()
                if chunks > 1:
                    use_chunked_attention(model, chunks)
            else:
                vae = vae if vae is not None else _load_vae(ckpt, vae_chunks)
                model = vae
            if comp == N.UNET and static_unet is not None:
                files = static_unet(stage)
            elif fmt == "tflite":
                files = export_tflite(comp, model, stage, precisions[comp], tfl_sizes,
                                      vae_factor, text_len, context_dim)
                model = None
                if comp == plan[-1] or comp == N.VAE_ENCODER:
                    vae = None
                components[comp] = ComponentSpec(comp, "tflite", files[0], precisions[comp],
                                                 file_entries(stage, files),
                                                 *tflite_io(stage / files[0], comp))
            else:
                with tempfile.TemporaryDirectory(dir=stage, prefix=f".{comp}-") as tmp:
                    src = trace_fp32(comp, model, Path(tmp), opset)
                    # the torch copy goes before the graph is loaded or quantized: with both
                    # resident, an SD 1.5 int8 conversion peaked at 14.3 GB RSS (now 4.8 GB)
                    model = None
                    if comp == plan[-1] or comp == N.VAE_ENCODER:
                        vae = None
                    gc.collect()
                    files = finish_component(comp, src, stage, precisions[comp])
            if fmt == "onnx":
                inputs, outputs = onnx_io(stage / files[0])
                components[comp] = ComponentSpec(comp, "onnx", files[0], precisions[comp],
                                                 file_entries(stage, files), inputs, outputs)
            size = sum(e.size for e in components[comp].files) / 1e6
            say(f"[{i}/{len(plan)}] {comp}: done in {time.perf_counter() - t0:.1f} s, "
                f"{size:.1f} MB")
        stage_meta = _export_vae_stages(ckpt, stage, precisions[N.VAE_DECODER], opset,
                                        components, say, vae_chunks) if vae_stages else None
        tok = export_tokenizer(ckpt, stage, int(text_cfg.get("max_position_embeddings", 77)))
        say("tokenizer: tokenizer.json written and checked")
        manifest = _manifest(ckpt, name or Path(checkpoint).absolute().name, components, tok,
                             opset, default_steps, default_guidance, chunks, vae_chunks)
        if stage_meta:
            manifest = replace(manifest, extra={**manifest.extra, N.VAE_STAGES: stage_meta})
        if fmt == "tflite":
            manifest = replace(manifest, extra={**manifest.extra,
                                                N.TFLITE_SIZES: [list(x) for x in tfl_sizes]},
                               converter={**manifest.converter, **_litert_versions()})
        if any(p == "int8" for p in precisions.values()):
            manifest = replace(manifest, converter={**manifest.converter,
                                                    "int8_method": int8_method})
        write_manifest(stage, manifest)
    say(f"bundle written to {Path(output)}")
    return manifest


def _load_vae(ckpt: Checkpoint, chunks: int) -> Any:
    vae = ckpt.load_vae()
    if chunks > 1:
        use_chunked_attention(vae, chunks)
    return vae


def _export_vae_stages(ckpt: Checkpoint, stage: Path, precision: str, opset: int,
                       components: dict[str, ComponentSpec], say: Progress,
                       vae_chunks: int = 1) -> list[dict]:
    """The VAE decoder again, as GroupNorm-delimited stages for exact tiled decoding."""
    from .vae_stages import export_decoder_stages
    t0 = time.perf_counter()
    precision = precision if precision in ("fp32", "fp16") else "fp32"
    exported = export_decoder_stages(_load_vae(ckpt, vae_chunks), stage, precision, opset)
    for name, files, _ in exported:
        inputs, outputs = onnx_io(stage / files[0])
        components[name] = ComponentSpec(name, "onnx", files[0], precision,
                                         file_entries(stage, files), inputs, outputs)
    say(f"vae decoder stages: {len(exported)} ({precision}) in {time.perf_counter() - t0:.1f} s")
    return [meta for _, _, meta in exported]


def _manifest(ckpt: Checkpoint, source_name: str, components: dict[str, ComponentSpec],
              tok: Any, opset: int, default_steps: int | None,
              default_guidance: float | None, attention_chunks: int = 1,
              vae_attention_chunks: int = 1) -> Manifest:
    unet_cfg, vae_cfg, sched = ckpt.config("unet"), ckpt.config("vae"), ckpt.config("scheduler")
    vae_factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    return Manifest(
        family="stable-diffusion",
        variant=_variant(unet_cfg, tok.pad_token, sched),
        source=SourceInfo(source_name, ckpt.fingerprint(), ckpt.pipeline_class,
                          ckpt.model_index.get("_diffusers_version")),
        converter=_converter_info(opset),
        components=components,
        scheduler=sched,
        prediction_type=sched.get("prediction_type", "epsilon"),
        vae=VaeSpec(float(vae_cfg.get("scaling_factor", AUTOENCODER_KL_DEFAULT_SCALING)),
                    vae_cfg.get("shift_factor"),
                    int(vae_cfg["latent_channels"]), vae_factor, vae_attention_chunks),
        unet=UnetSpec(int(unet_cfg["in_channels"]), int(unet_cfg["sample_size"]),
                      _cross_dim(unet_cfg), attention_chunks),
        tokenizer=tok,
        defaults=_defaults(sched, int(unet_cfg["sample_size"]) * vae_factor, default_steps,
                           default_guidance),
        # UNet down/up-sampling needs latent sizes divisible by 2**(levels - 1)
        extra={N.SIZE_MULTIPLE: vae_factor * 2 ** (len(unet_cfg["block_out_channels"]) - 1)},
    )


def _attention_chunks(value: int | str, sample_size: int) -> int:
    if value == "auto":
        return auto_chunks(sample_size)
    try:
        chunks = int(value)
    except (TypeError, ValueError):
        chunks = 0
    if chunks < 1:
        raise ConversionError(f"attention chunks must be 'auto' or a whole number >= 1, "
                              f"got {value!r}")
    return chunks


def _cross_dim(unet_cfg: dict[str, Any]) -> int:
    d = unet_cfg["cross_attention_dim"]
    return int(d[0] if isinstance(d, (list, tuple)) else d)


def _variant(unet_cfg: dict[str, Any], pad: str, sched: dict[str, Any]) -> str:
    if _cross_dim(unet_cfg) == 1024 or pad == "!" or sched.get("prediction_type") == "v_prediction":
        return "sd2"
    return "sd1"


def _converter_info(opset: int) -> dict[str, Any]:
    import diffusers
    import onnx
    import torch
    return {"name": "edge-convert", "version": __version__, "opset": opset,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "onnx": onnx.__version__, "python": platform.python_version()}


def _litert_versions() -> dict[str, str]:
    from importlib.metadata import version
    return {p: version(p) for p in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert")}


def _convert_static(checkpoint: str | Path, output: str | Path, precisions: dict[str, str],
                    calibration: str | Path | None, say: Progress,
                    args: dict[str, Any]) -> Manifest:
    """Convert an fp32 bundle aside, record its UNet's inputs over the calibration prompts,
    then convert for real with the UNet quantized statically from that fp32 graph."""
    import tempfile

    from .calibrate import quantize_int8_static, read_prompts, unet_trajectories
    from .export_onnx import INT4_KEEP_FP32
    prompts = read_prompts(calibration)
    parent = Path(output).resolve().parent
    with tempfile.TemporaryDirectory(dir=parent, prefix=".edge-convert-calib-") as tmp:
        ref = Path(tmp) / "fp32"
        say("static int8: converting an fp32 reference for calibration")
        convert(checkpoint, ref, precision="fp32", allow_pickle=args["allow_pickle"],
                opset=args["opset"], default_steps=args["default_steps"],
                default_guidance=args["default_guidance"], vae_encoder=False,
                attention_chunks=args["attention_chunks"],
                progress=lambda m: say(f"  (fp32 reference) {m}"))
        say(f"static int8: calibrating on {len(prompts)} prompts")
        feeds = unet_trajectories(ref, prompts)
        spec = ",".join(f"{c}={p}" for c, p in precisions.items())
        return convert(checkpoint, output, fmt=args["fmt"], precision=spec,
                       overwrite=args["overwrite"], allow_pickle=args["allow_pickle"],
                       opset=args["opset"], default_steps=args["default_steps"],
                       default_guidance=args["default_guidance"],
                       vae_encoder=args["vae_encoder"], int8_method="static", progress=say,
                       vae_stages=args["vae_stages"], name=args["name"],
                       attention_chunks=args["attention_chunks"],
                       static_unet=lambda stage: quantize_int8_static(
                           ref / "unet.onnx", stage, N.UNET, feeds, keep=INT4_KEEP_FP32))
