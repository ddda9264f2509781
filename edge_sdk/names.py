"""Bundle-level names shared by the converter (which writes bundles) and the runtime.

Files, component roles, precisions and formats live here; each component kind's tensor
names live in edge_sdk.contracts. Both sides import them, so they agree by construction.
"""

from __future__ import annotations

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "edge-sdk-bundle"
FORMAT_VERSION = 2
TOKENIZER_FILE = "tokenizer.json"
QUALITY_FILE = "quality.json"  # written by `edge-convert verify`
WEIGHT_MAP_SUFFIX = ".weights.json"  # checkpoint parameter name -> graph initializer name

# Component roles (the manifest's keys), in the order a generation uses them. A role's kind
# (its I/O contract) is recorded beside it: several roles may share a kind.
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"  # SDXL's second (OpenCLIP bigG, with projection)
UNET = "unet"
UNET_SHALLOW = "unet_shallow"  # the UNet's shallow branch, for feature caching
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
VAE_DECODER_TINY = "vae_decoder_tiny"  # a tiny decoder (AutoencoderTiny, e.g. TAESD)
VAE_DECODER_STAGE = "vae_decoder_stage"  # the kind of each `vae_decoder_sNN` role
VAE_ENCODER_STAGE = "vae_encoder_stage"  # the kind of each `vae_encoder_sNN` role
# A ControlNet bundle's ControlNets: roles controlnet_0, controlnet_1 ... in the order
# given at conversion (a generation's control images come in that order); their kind, and
# the --precision key that sets them all (default: the UNet's precision)
CONTROLNET = "controlnet"


def controlnet_role(index: int) -> str:
    return f"{CONTROLNET}_{index}"


COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER,
              VAE_DECODER_TINY)
REQUIRED_COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER)
# standard roles whose kind has another name
ROLE_KINDS = {VAE_DECODER_TINY: VAE_DECODER, TEXT_ENCODER_2: TEXT_ENCODER}

# Tokenizer roles: the tokenizer that feeds each text encoder.
TOKENIZER = "tokenizer"
TOKENIZER_2 = "tokenizer_2"  # feeds TEXT_ENCODER_2
TOKENIZER_2_FILE = "tokenizer_2.json"

# w8a8 / w8a16: static QDQ graphs (int8 weights; uint8 / uint16 activations, calibrated),
# what NPUs take: ONNX UNets only
QDQ_PRECISIONS = ("w8a8", "w8a16")
# TFLite's full-integer UNet: int8 weights and activations, float at its edges
FULL_INT = "int8-full"
PRECISIONS = ("fp32", "fp16", "int8", "int4") + QDQ_PRECISIONS + (FULL_INT,)
DECODERS = ("full", "tiny", "auto")  # which decoder a generation uses (auto: tiny in low)
BACKEND_FORMATS = ("onnx", "tflite")

RECONVERT_HINT = "re-convert it with `edge-convert CHECKPOINT -o BUNDLE --overwrite`"
