"""Names shared by the converter (which writes bundles) and the runtime (which reads them).

Keep every string that appears in a bundle here, so both sides agree by construction.
"""

from __future__ import annotations

MANIFEST_FILE = "manifest.json"
BUNDLE_FORMAT = "edge-sdk-bundle"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
QUALITY_FILE = "quality.json"  # written by `edge-convert verify`

# Components, in the order a generation uses them.
TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
REQUIRED_COMPONENTS = (TEXT_ENCODER, UNET, VAE_DECODER)

# Tensor names of each component's graph.
TEXT_INPUT_IDS = "input_ids"
TEXT_HIDDEN_STATES = "last_hidden_state"
TEXT_POOLED = "pooler_output"

UNET_SAMPLE = "sample"
UNET_TIMESTEP = "timestep"
UNET_CONTEXT = "encoder_hidden_states"
UNET_OUTPUT = "out_sample"

VAE_LATENTS = "latent_sample"
VAE_IMAGE = "image"  # decoder output, encoder input: NCHW, values in [-1, 1]
VAE_LATENT_MEAN = "latent_mean"
VAE_LATENT_LOGVAR = "latent_logvar"

# Symbolic (dynamic) dimension names used in the manifest.
DIM_BATCH = "batch"
DIM_HEIGHT = "height"
DIM_WIDTH = "width"
DIM_SEQUENCE = "sequence"

PRECISIONS = ("fp32", "fp16", "int8", "int4")
BACKEND_FORMATS = ("onnx", "tflite")

# manifest.extra key: the VAE decoder as stages for exact tiled decoding (edge_sdk.tiling)
VAE_STAGES = "vae_decoder_stages"
# manifest.extra key: the image sizes ([height, width] pixels) a TFLite bundle was exported for
TFLITE_SIZES = "tflite_sizes"
# manifest.extra key: image sides must be multiples of this many pixels (the UNet's levels)
SIZE_MULTIPLE = "size_multiple"
