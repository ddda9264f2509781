"""What a single-file checkpoint holds, read from its tensor names and shapes alone.

Checkpoints in the original Stable Diffusion layout (as trainers and sharing sites publish
them) keep every component in one file under fixed prefixes: the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, the text encoder under
`cond_stage_model.` (SD 1.x: Hugging Face's CLIP layout; SD 2.x: OpenCLIP's), or SDXL's two
under `conditioner.embedders.0.transformer.` (CLIP) and `conditioner.embedders.1.model.`
(OpenCLIP bigG). The family
follows from the text encoder's layout, the UNet's cross-attention width and its input
channels; what the weights cannot tell (SD 2.x's prediction type) is left to the caller.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from edge_sdk.errors import ConversionError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: transformers' CLIPTextModel keys
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP's text tower
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
CLIP_TOKENS = CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
# files written with transformers before 4.x's text_model level lack it
CLIP_TOKENS_OLD = CLIP_PREFIX + "embeddings.token_embedding.weight"
OPEN_CLIP_TOKENS = OPEN_CLIP_PREFIX + "token_embedding.weight"
XL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL's first text encoder
XL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's second (OpenCLIP bigG)
XL_CLIP_TOKENS = XL_CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
XL_OPEN_CLIP_TOKENS = XL_OPEN_CLIP_PREFIX + "token_embedding.weight"

TEXT_CLIP, TEXT_OPEN_CLIP, TEXT_XL = "clip", "open_clip", "sdxl"
# (text encoder layout, cross-attention width) -> family; inpainting: a 9-channel UNet
KNOWN = {(TEXT_CLIP, 768): "sd1", (TEXT_OPEN_CLIP, 1024): "sd2", (TEXT_XL, 2048): "sdxl"}
# sdxl-turbo: SDXL's weights with Turbo's configs (512 px, Euler ancestral, trailing
# spacing, 1 step): a file cannot tell them apart, so it is asked for with --family
FAMILIES = ("sd1", "sd1-inpainting", "sd2", "sd2-inpainting", "sdxl", "sdxl-turbo")
LATENT_CHANNELS = 4
INPAINT_CHANNELS = 2 * LATENT_CHANNELS + 1  # latents + mask + masked-image latents


@dataclass(frozen=True)
class FileLayout:
    """The facts a single file's header gives."""

    text: str  # TEXT_CLIP | TEXT_OPEN_CLIP | TEXT_XL (both)
    context_dim: int  # the UNet's cross-attention width
    in_channels: int  # the UNet's input channels
    has_vae: bool

    @property
    def inpainting(self) -> bool:
        return self.in_channels == INPAINT_CHANNELS

    @property
    def family(self) -> str | None:
        """The known family these weights belong to, None when none matches."""
        base = KNOWN.get((self.text, self.context_dim))
        if base is None or self.in_channels not in (LATENT_CHANNELS, INPAINT_CHANNELS):
            return None
        return base + ("-inpainting" if self.inpainting else "")

    def describe(self) -> str:
        what = {TEXT_OPEN_CLIP: "an OpenCLIP text encoder",
                TEXT_XL: "SDXL's two text encoders"}.get(self.text, "a CLIP text encoder")
        return (f"{what}, "
                f"a UNet with {self.in_channels} input channels and cross-attention width "
                f"{self.context_dim}")


def read_layout(shapes: Mapping[str, Sequence[int]], where: str) -> FileLayout:
    """The layout of a single file from its tensors' names and shapes, or a ConversionError
    naming what was found instead (another kind of file, SDXL, an unknown architecture)."""
    _refuse_other_models(shapes, where)
    if CONV_IN not in shapes:
        _refuse_other_files(shapes, where)
        raise ConversionError(f"{where}: no Stable Diffusion UNet in the original layout "
                              f"({CONV_IN} is missing); found {_summary(shapes)}. Convert "
                              "the diffusers folder of this model instead")
    clip = next((k for k in (CLIP_TOKENS, CLIP_TOKENS_OLD) if k in shapes), None)
    if XL_CLIP_TOKENS in shapes and XL_OPEN_CLIP_TOKENS in shapes:
        text, width = TEXT_XL, _dim(shapes, XL_CLIP_TOKENS, 1, 2, where) \
            + _dim(shapes, XL_OPEN_CLIP_TOKENS, 1, 2, where)
    elif clip is not None:
        text, width = TEXT_CLIP, _dim(shapes, clip, 1, 2, where)
    elif OPEN_CLIP_TOKENS in shapes:
        text, width = TEXT_OPEN_CLIP, _dim(shapes, OPEN_CLIP_TOKENS, 1, 2, where)
    else:
        raise ConversionError(f"{where}: no text encoder (cond_stage_model.transformer.* or "
                              f"cond_stage_model.model.*); found {_summary(shapes)}. "
                              "edge-convert needs the whole model in the file")
    context = _context_dim(shapes, where)
    if context is not None and context != width:
        raise ConversionError(f"{where}: the UNet's cross-attention width is {context} but "
                              f"the text encoder's is {width}: the file mixes components of "
                              "different models")
    return FileLayout(text, width, _dim(shapes, CONV_IN, 1, 4, where),
                      any(k.startswith(VAE_PREFIX) for k in shapes))


def _dim(shapes: Mapping[str, Sequence[int]], name: str, axis: int, rank: int,
         where: str) -> int:
    """Dimension `axis` of tensor `name`, which must have `rank` dimensions."""
    shape = tuple(shapes[name])
    if len(shape) != rank:
        raise ConversionError(f"{where}: tensor {name} has shape {shape}, not {rank} "
                              "dimensions: not a Stable Diffusion checkpoint, or a damaged one")
    return int(shape[axis])


def _context_dim(shapes: Mapping[str, Sequence[int]], where: str) -> int | None:
    """The width of the UNet's cross-attention keys (None for a UNet without any)."""
    for name in shapes:
        if name.startswith(UNET_PREFIX) and name.endswith("attn2.to_k.weight"):
            return _dim(shapes, name, 1, 2, where)
    return None


# models in the original layout that share SD's prefixes but are other architectures
_OTHER_MODELS = ((("embedder.", "noise_augmentor."), "an unCLIP (image variation) checkpoint "
                  "(embedder.*, noise_augmentor.*), which edge-convert does not support"),)


def _refuse_other_models(shapes: Mapping[str, Sequence[int]], where: str) -> None:
    if any(n.startswith("conditioner.embedders.") for n in shapes) and not (
            XL_CLIP_TOKENS in shapes and XL_OPEN_CLIP_TOKENS in shapes):
        raise ConversionError(f"{where}: an SGM-layout checkpoint (conditioner.embedders.*) "
                              "without SDXL base's two text encoders: an SDXL refiner or "
                              "another model; edge-convert takes SDXL base and Turbo files")
    for prefixes, what in _OTHER_MODELS:
        if any(n.startswith(prefixes) for n in shapes):
            raise ConversionError(f"{where}: {what}")


def _refuse_other_files(shapes: Mapping[str, Sequence[int]], where: str) -> None:
    """Files without a UNet that are no checkpoint, named for what they are."""
    names = list(shapes)
    if any(n.startswith(("lora_unet_", "lora_te")) or ".lora_" in n or "lora_A" in n
           or "lora_down" in n for n in names):
        raise ConversionError(f"{where}: a LoRA, not a checkpoint; apply it to a checkpoint "
                              "with --lora FILE[:SCALE]")
    if names and all(n.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv"))
                     for n in names):
        raise ConversionError(f"{where}: a VAE alone, not a checkpoint; give it with --vae "
                              "FILE beside the model's checkpoint")


def _summary(shapes: Mapping[str, Sequence[int]], top: int = 4) -> str:
    """The commonest name prefixes (two dotted parts) with their tensor counts."""
    if not shapes:
        return "no tensors"
    counts = Counter(".".join(n.split(".")[:2]) for n in shapes)
    parts = [f"{p}.* ({c})" for p, c in counts.most_common(top)]
    more = len(counts) - top
    return f"{len(shapes)} tensors under " + ", ".join(parts) + (f" and {more} more prefixes"
                                                                if more > 0 else "")


def check_family(name: str) -> str:
    if name not in FAMILIES:
        raise ConversionError(f"--family {name!r} unknown; choose one of {list(FAMILIES)} "
                              "(or give --config DIR for another architecture)")
    return name
