"""What an SDXL checkpoint changes in a conversion: the options it takes, checked before any
export (its two text encoders, added conditions and VAE are handled by the registry, the
tokenizer export and the manifest)."""

from __future__ import annotations

import logging
from dataclasses import replace

from edge_sdk import names as N
from edge_sdk.errors import ConversionError

from .options import ConvertOptions

log = logging.getLogger(__name__)

# diffusers' StableDiffusionXLPipeline default guidance (SD 1.x/2.x: 7.5)
XL_GUIDANCE = 5.0
_VAE_ROLES = (N.VAE_DECODER, N.VAE_ENCODER)


def check_xl_options(opts: ConvertOptions) -> ConvertOptions:
    """The options an SDXL conversion serves; SDXL's VAE (not a tiny decoder, which is
    fp16-safe) kept fp32 where fp16 was not asked of it by name (its activations overflow
    fp16: diffusers upcasts it, `force_upcast`)."""
    refused = [(opts.fmt == "tflite", "--format tflite (LiteRT's flatbuffers stop at 2 GB "
                "and SDXL's UNet is 10 GB in fp32; it would have to be split into graphs)"),
               (opts.static_qdq is not None or opts.full_int,
                "static quantization (--precision w8a8/w8a16, --int8-method static)"),
               (bool(opts.loras), "--lora (SDXL LoRAs name two text encoders' layers)"),
               (bool(opts.embeddings), "--embedding (SDXL embeddings hold one vector per "
                "text encoder)"),
               (bool(opts.controlnets), "--controlnet (SD 1.x/2.x ControlNets are converted)")]
    for bad, what in refused:
        if bad:
            raise ConversionError(f"{what}: not available for SDXL checkpoints yet; SDXL "
                                  "converts to ONNX at fp32, fp16, int8 or int4")
    named = {p.strip().rpartition("=")[0] for p in opts.precision.split(",")}
    fp16 = [r for r in _VAE_ROLES if opts.precisions[r] == "fp16"]
    if fp16 and not named & {"vae", *_VAE_ROLES}:
        log.warning("SDXL's VAE overflows in fp16 (diffusers upcasts it): it is kept fp32; "
                    "--precision fp16,vae=fp16 forces it (for a fixed-scale fp16 VAE, with "
                    "--vae)")
        opts = replace(opts, precision=opts.precision + "".join(f",{r}=fp32" for r in fp16))
    return opts
