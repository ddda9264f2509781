"""The manifest of a converted bundle, built in one piece from the checkpoint's configs, the
options and what the exporters wrote."""

from __future__ import annotations

import datetime as _dt
import platform
from dataclasses import dataclass
from typing import Any, Mapping

from edge_sdk import names as N
from edge_sdk.manifest import (ComponentSpec, DecoderStage, Defaults, Manifest, PreviewLayer,
                               SourceInfo, TextSpec, TokenizerSpec, UnetSpec, VaeSpec)

from . import __version__
from .attention import VAE_AUTO_CHUNKS, auto_chunks
from .checkpoint import Checkpoint
from .controlnet import residual_layout
from .options import ConvertOptions, tiny_vae_config
from .registry import Shapes
from .sdxl import XL_GUIDANCE

# AutoencoderKL's own default, used by diffusers when a VAE config.json omits scaling_factor
AUTOENCODER_KL_DEFAULT_SCALING = 0.18215


@dataclass(frozen=True)
class Layout:
    """What the checkpoint's configs and the options fix about the graphs."""

    shapes: Shapes
    native: int  # native image side, pixels
    size_multiple: int  # image sides must be multiples of this (the VAE's factor: the UNet
    # graph takes any latent size, see registry._unet_example)
    unet_chunks: int  # self-attention query slices in the UNet graph
    vae_chunks: int  # the same for the VAE's mid-block attention

    @classmethod
    def of(cls, ckpt: Checkpoint, opts: ConvertOptions) -> "Layout":
        unet, vae = ckpt.config("unet"), ckpt.config("vae")
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        chunks = attention_chunks(opts.attention_chunks, int(unet["sample_size"]))
        return cls(Shapes(int(ckpt.config("text_encoder").get("max_position_embeddings", 77)),
                          cross_dim(unet), factor),
                   int(unet["sample_size"]) * factor,
                   factor, chunks,
                   VAE_AUTO_CHUNKS if opts.attention_chunks == "auto" else chunks)


def attention_chunks(value: int | str, sample_size: int) -> int:
    from edge_sdk.errors import ConversionError
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


def attention_levels(unet_cfg: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """(downscale, heads) of each UNet level with attention, the mid block included (its
    heads: diffusers' num_attention_heads, or attention_head_dim, which SD 1.x/2.x configs
    use for the head count)."""
    blocks = list(unet_cfg.get("down_block_types", ()))
    heads = unet_cfg.get("num_attention_heads") or unet_cfg.get("attention_head_dim") or 8
    per_level = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(blocks)
    out = [(2 ** i, int(per_level[i])) for i, b in enumerate(blocks) if "Attn" in b]
    if "Attn" in str(unet_cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")) and blocks:
        out.append((2 ** (len(blocks) - 1), int(per_level[-1])))
    return tuple(out)


def cross_dim(unet_cfg: Mapping[str, Any]) -> int:
    d = unet_cfg["cross_attention_dim"]
    return int(d[0] if isinstance(d, (list, tuple)) else d)


def build_manifest(ckpt: Checkpoint, opts: ConvertOptions, layout: Layout, source_name: str,
                   components: dict[str, ComponentSpec], toks: dict[str, TokenizerSpec],
                   stages: tuple[tuple[DecoderStage, ...], tuple[DecoderStage, ...]],
                   static_sizes: tuple[tuple[int, int], ...] | None,
                   latent_rgb: tuple[tuple[float, ...], ...] = (),
                   preview_decoder: tuple[PreviewLayer, ...] = (),
                   extra: Mapping[str, Any] | None = None) -> Manifest:
    """The manifest; `extra`: more of what the converter did (static quantization's
    calibration and float layers), under `converter`."""
    unet_cfg, vae_cfg, sched = ckpt.config("unet"), ckpt.config("vae"), ckpt.config("scheduler")
    converter = {**_converter_info(opts), **(extra or {})}
    converter["source"] = ckpt.describe()
    if ckpt.loras:  # fused at conversion: the bundle's weights are no longer the checkpoint's
        converter["loras"] = [lora.describe() for lora in ckpt.loras]
    if ckpt.embeddings:
        converter["embeddings"] = [e.describe() for e in ckpt.embeddings]
    xl = ckpt.is_xl
    return Manifest(
        family="stable-diffusion",
        variant="sdxl" if xl else _variant(unet_cfg, toks[N.TOKENIZER].pad_token, sched),
        source=SourceInfo(source_name, ckpt.fingerprint(), ckpt.pipeline_class,
                          ckpt.model_index.get("_diffusers_version")),
        converter=converter, components=components, tokenizers=toks,
        scheduler=sched, prediction_type=sched.get("prediction_type", "epsilon"),
        vae=VaeSpec(float(vae_cfg.get("scaling_factor", AUTOENCODER_KL_DEFAULT_SCALING)),
                    vae_cfg.get("shift_factor"), int(vae_cfg["latent_channels"]),
                    layout.shapes.vae_factor, layout.vae_chunks, stages[0],
                    int(vae_cfg["block_out_channels"][0]), stages[1],
                    _tiny_scaling(opts), latent_rgb, preview_decoder),
        unet=UnetSpec(int(unet_cfg["in_channels"]), int(unet_cfg["sample_size"]),
                      cross_dim(unet_cfg), layout.unet_chunks, layout.size_multiple,
                      attention_levels(unet_cfg), int(unet_cfg["block_out_channels"][0]),
                      int(unet_cfg.get("time_cond_proj_dim") or 0),
                      residual_layout(unet_cfg) if ckpt.controlnets else ()),
        defaults=_defaults(sched, layout.native, opts.default_steps, opts.default_guidance,
                           bool(unet_cfg.get("time_cond_proj_dim")), xl),
        static_sizes=static_sizes, text=_text(ckpt),
        controlnets=tuple(c.spec(N.controlnet_role(i))
                          for i, c in enumerate(ckpt.controlnets)))


def _text(ckpt: Checkpoint) -> TextSpec:
    """SDXL reads both encoders' penultimate layers and the second's pooled projection; its
    pipeline's force_zeros_for_empty_prompt is in model_index.json (diffusers' default for
    SDXL: on)."""
    if not ckpt.is_xl:
        return TextSpec()
    return TextSpec((N.TEXT_ENCODER, N.TEXT_ENCODER_2), penultimate=True,
                    pooled=N.TEXT_ENCODER_2, force_zeros_for_empty_prompt=bool(
                        ckpt.model_index.get("force_zeros_for_empty_prompt", True)))


def _tiny_scaling(opts: ConvertOptions) -> float:
    """The tiny decoder's scaling_factor (AutoencoderTiny's default 1.0), 0 without one."""
    if opts.tiny_vae is None:
        return 0.0
    return float(tiny_vae_config(opts.tiny_vae).get("scaling_factor", 1.0))


def _defaults(sched: Mapping[str, Any], size: int, steps: int | None,
              guidance: float | None, guidance_embedded: bool = False,
              xl: bool = False) -> Defaults:
    # Distilled models (LCM, Turbo) want few steps and no classifier-free guidance; an
    # LCM-distilled UNet embeds the scale instead (diffusers' LatentConsistencyModelPipeline
    # defaults to 4 steps at 8.5).
    cls = sched.get("_class_name")
    if guidance_embedded:
        d_steps, d_guid = 4, 8.5
    elif cls == "LCMScheduler":
        d_steps, d_guid = 4, 1.0
    elif cls == "EulerAncestralDiscreteScheduler" and sched.get("timestep_spacing") == "trailing":
        d_steps, d_guid = 1, 0.0  # SD-Turbo's configuration
    else:  # (diffusers' SDXL pipeline guides at 5.0)
        d_steps, d_guid = 25, XL_GUIDANCE if xl else 7.5
    return Defaults(steps=steps or d_steps,
                    guidance_scale=d_guid if guidance is None else float(guidance),
                    width=size, height=size)


def _variant(unet_cfg: Mapping[str, Any], pad: str, sched: Mapping[str, Any]) -> str:
    if cross_dim(unet_cfg) == 1024 or pad == "!" or sched.get("prediction_type") == "v_prediction":
        return "sd2"
    return "sd1"


def _converter_info(opts: ConvertOptions) -> dict[str, Any]:
    import diffusers
    import onnx
    import torch
    info: dict[str, Any] = {
        "name": "edge-convert", "version": __version__, "opset": opts.opset,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "onnx": onnx.__version__, "python": platform.python_version()}
    if opts.fmt == "tflite":
        from importlib.metadata import version
        info.update({p: version(p) for p in ("litert-torch", "ai-edge-quantizer",
                                             "ai-edge-litert")})
    if "int8" in opts.precisions.values():
        info["int8_method"] = opts.int8_method
    return info
