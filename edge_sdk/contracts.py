"""The I/O contract of every kind of bundle component, written once for both sides.

The converter exports each graph with exactly these input and output names, dtypes and
dynamic axes; the runtime builds its feeds and reads its outputs by the same names, and the
manifest records what the exporter wrote so a load can check the two agree. A new kind of
network (a second text encoder, a tiny decoder, a ControlNet) is a new contract here; a new
input of an existing network (SDXL's added conditions, LCM's guidance embedding) is a new
optional tensor of its contract, which the runtime feeds only when the graph declares it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TensorContract", "ComponentContract", "CONTRACTS", "contract_of",
           "TEXT_ENCODER", "UNET", "UNET_SHALLOW", "VAE_DECODER", "VAE_ENCODER",
           "VAE_DECODER_STAGE", "VAE_ENCODER_STAGE", "CONTROLNET", "ControlNetIO",
           "MAX_DOWN_RESIDUALS", "residual_pairs", "COMPUTE_BOUND_KINDS",
           "DIM_BATCH", "DIM_HEIGHT", "DIM_WIDTH", "DIM_SEQUENCE"]

# Symbolic (dynamic) dimension names, as recorded in the manifest's tensor shapes.
DIM_BATCH = "batch"
DIM_HEIGHT = "height"
DIM_WIDTH = "width"
DIM_SEQUENCE = "sequence"

_SPATIAL = {0: DIM_BATCH, 2: DIM_HEIGHT, 3: DIM_WIDTH}


@dataclass(frozen=True)
class TensorContract:
    """One input or output: its name, numpy dtype and dynamic axes (index -> axis name).
    `optional` tensors exist only in graphs of models that have them."""

    name: str
    dtype: str = "float32"
    axes: tuple[tuple[int, str], ...] = ((0, DIM_BATCH),)
    optional: bool = False

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return dict(self.axes)


@dataclass(frozen=True)
class ComponentContract:
    """A kind of component: its graph's inputs and outputs, in export order."""

    kind: str
    inputs: tuple[TensorContract, ...]
    outputs: tuple[TensorContract, ...]

    def input_names(self, optional: bool = False) -> list[str]:
        return [t.name for t in self.inputs if optional or not t.optional]

    def output_names(self, optional: bool = False) -> list[str]:
        return [t.name for t in self.outputs if optional or not t.optional]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """For torch.onnx.export: every tensor's dynamic axes by name."""
        return {t.name: t.dynamic_axes for t in self.inputs + self.outputs}

    def tensor(self, name: str) -> TensorContract:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.kind} has no tensor {name!r}")


def _spatial(name: str, dtype: str = "float32") -> TensorContract:
    return TensorContract(name, dtype, tuple(_SPATIAL.items()))


class TextEncoderIO:
    """CLIP text encoder: token ids -> hidden states (the UNet's context) and pooled output."""

    INPUT_IDS = "input_ids"
    HIDDEN_STATES = "last_hidden_state"
    POOLED = "pooler_output"
    # clip skip: every layer's input (the embeddings, then each layer's output but the
    # last) through the final LayerNorm, [batch, layers, tokens, dim]; `clip_skip=N` reads
    # [:, layers - N] (diffusers' hidden_states[-(N + 1)], normed)
    LAYER_STATES = "layer_states"
    # SDXL reads a layer's hidden states as they are, not through the final LayerNorm:
    # every layer's input (the embeddings, then each layer's output but the last),
    # [batch, layers, tokens, dim]; [:, layers - 1 - N] is diffusers' hidden_states[-(N + 2)]
    HIDDEN_LAYERS = "hidden_layers"
    # the pooled output through the text projection (CLIPTextModelWithProjection's
    # text_embeds): SDXL's UNet takes the second encoder's
    TEXT_EMBEDS = "text_embeds"


class UnetIO:
    """The denoiser: noisy latents, timestep and text context -> the model output; an
    LCM-distilled UNet also takes the guidance scale as an embedding (`timestep_cond`)."""

    SAMPLE = "sample"
    TIMESTEP = "timestep"
    CONTEXT = "encoder_hidden_states"
    TIMESTEP_COND = "timestep_cond"
    # SDXL's added conditions: the second text encoder's projected pooled output and the
    # six micro-conditioning numbers (original size, crop's top-left, target size; h, w)
    TEXT_EMBEDS = "text_embeds"
    TIME_IDS = "time_ids"
    OUTPUT = "out_sample"
    # feature caching (edge_sdk.feature_cache): the state entering the last up block's
    # shallow layers, an optional output of the UNet and an input of its shallow branch
    DEEP_FEATURES = "deep_features"
    # a ControlNet bundle's UNet: the residuals added to each skip connection of its down
    # path (down_block_additional_residual_0 ...) and to its middle block's output,
    # diffusers' down_block_additional_residuals / mid_block_additional_residual
    MID_RESIDUAL = "mid_block_additional_residual"

    @staticmethod
    def down_residual(i: int) -> str:
        return f"down_block_additional_residual_{i}"


class ControlNetIO:
    """A ControlNet: the UNet's inputs and the control image (RGB in [0, 1], at the image's
    size) -> a residual for each skip of the UNet's down path and one for its middle block,
    unscaled (the conditioning scale, guess mode's ramp and start/end are applied by the
    runtime, outside the graph)."""

    COND = "controlnet_cond"
    MID = "mid_block_res_sample"

    @staticmethod
    def down(i: int) -> str:
        return f"down_block_res_sample_{i}"


class VaeIO:
    """The VAE halves: latents <-> images (NCHW, values in [-1, 1])."""

    LATENTS = "latent_sample"
    IMAGE = "image"
    LATENT_MEAN = "latent_mean"
    LATENT_LOGVAR = "latent_logvar"


class StageIO:
    """One stage of a VAE half split at its GroupNorms (edge_sdk.tiling): the stage
    input, an earlier stage's output (a resnet's shortcut), the GroupNorm statistics computed
    over the whole map, and the stage output."""

    X = "x"
    SKIP = "skip"
    MEAN = "mean"
    INV_STD = "inv_std"
    Y = "y"


TEXT_ENCODER = ComponentContract(
    "text_encoder",
    (TensorContract(TextEncoderIO.INPUT_IDS, "int64"),),
    (TensorContract(TextEncoderIO.HIDDEN_STATES), TensorContract(TextEncoderIO.POOLED),
     TensorContract(TextEncoderIO.LAYER_STATES, optional=True),
     TensorContract(TextEncoderIO.HIDDEN_LAYERS, optional=True),
     TensorContract(TextEncoderIO.TEXT_EMBEDS, optional=True)))

def residual_pairs(skips: int) -> list[tuple[str, str]]:
    """(ControlNet output, UNet input) names of the residuals of a down path with `skips`
    skip connections, in order, then the middle block's."""
    return [(ControlNetIO.down(i), UnetIO.down_residual(i)) for i in range(skips)] + [
        (ControlNetIO.MID, UnetIO.MID_RESIDUAL)]


# The most skip connections a UNet's down path has (SD 1.x/2.x: 12, SDXL: 9): the
# ControlNet residual tensors the contracts name
MAX_DOWN_RESIDUALS = 16


def _residuals(name: Any, mid: str) -> tuple[TensorContract, ...]:
    return tuple(TensorContract(name(i), axes=tuple(_SPATIAL.items()), optional=True)
                 for i in range(MAX_DOWN_RESIDUALS)) + (
        TensorContract(mid, axes=tuple(_SPATIAL.items()), optional=True),)


UNET = ComponentContract(
    "unet",
    (_spatial(UnetIO.SAMPLE), TensorContract(UnetIO.TIMESTEP),
     TensorContract(UnetIO.CONTEXT, axes=((0, DIM_BATCH), (1, DIM_SEQUENCE))),
     TensorContract(UnetIO.TIMESTEP_COND, optional=True),
     TensorContract(UnetIO.TEXT_EMBEDS, optional=True),
     TensorContract(UnetIO.TIME_IDS, optional=True))
    + _residuals(UnetIO.down_residual, UnetIO.MID_RESIDUAL),
    (_spatial(UnetIO.OUTPUT),
     TensorContract(UnetIO.DEEP_FEATURES, axes=tuple(_SPATIAL.items()), optional=True)))

# The UNet's shallow branch for feature caching: the UNet's inputs and the deep features a
# full step wrote (converters.feature_cache). Its context is optional: a branch without
# cross-attention or a caption embedding (tiny UNets' first and last blocks) does not read
# it, and the exporter drops an input the graph does not use.
UNET_SHALLOW = ComponentContract(
    "unet_shallow", UNET.inputs[:2] + (
        TensorContract(UnetIO.CONTEXT, axes=((0, DIM_BATCH), (1, DIM_SEQUENCE)), optional=True),
        _spatial(UnetIO.DEEP_FEATURES)) + UNET.inputs[3:6],
    (_spatial(UnetIO.OUTPUT),))

# A ControlNet: the UNet's first inputs, its added conditions where it has them, the
# control image; the residuals out (as many as the UNet's down path has skips)
CONTROLNET = ComponentContract(
    "controlnet", UNET.inputs[:3] + UNET.inputs[4:6] + (_spatial(ControlNetIO.COND),),
    _residuals(ControlNetIO.down, ControlNetIO.MID))

VAE_DECODER = ComponentContract("vae_decoder", (_spatial(VaeIO.LATENTS),),
                                (_spatial(VaeIO.IMAGE),))

VAE_ENCODER = ComponentContract("vae_encoder", (_spatial(VaeIO.IMAGE),),
                                (_spatial(VaeIO.LATENT_MEAN), _spatial(VaeIO.LATENT_LOGVAR)))

def _stage_contract(kind: str) -> ComponentContract:
    return ComponentContract(
        kind,
        (_spatial(StageIO.X), TensorContract(StageIO.SKIP, axes=tuple(_SPATIAL.items()),
                                             optional=True),
         TensorContract(StageIO.MEAN, optional=True), TensorContract(StageIO.INV_STD,
                                                                      optional=True)),
        (_spatial(StageIO.Y),))


VAE_DECODER_STAGE = _stage_contract("vae_decoder_stage")
# the encoder's stages: the same I/O; the last one's `y` is the latent moments (mean and
# logvar stacked on channels, as the encoder's quant_conv writes them)
VAE_ENCODER_STAGE = _stage_contract("vae_encoder_stage")

# Kinds run fully optimized, with onnxruntime's arena, even when memory is low: a decoder
# stage holds a few MB of weights (their repacked copy costs that much again) and runs
# convolutions at full resolution, where unpacked weights made SD 1.5's tiled decode 3.5x
# slower and no arena 1.3x. Plans that map weights release such a session after its stage,
# so one stage's arena and repacked weights are held at a time.
COMPUTE_BOUND_KINDS = (VAE_DECODER_STAGE.kind, VAE_ENCODER_STAGE.kind)

CONTRACTS: dict[str, ComponentContract] = {c.kind: c for c in (
    TEXT_ENCODER, UNET, UNET_SHALLOW, VAE_DECODER, VAE_ENCODER, VAE_DECODER_STAGE,
    VAE_ENCODER_STAGE, CONTROLNET)}


def contract_of(kind: str) -> ComponentContract:
    """The contract of a component kind (KeyError names the kinds this runtime knows)."""
    try:
        return CONTRACTS[kind]
    except KeyError:
        raise KeyError(f"unknown component kind {kind!r}; known: {sorted(CONTRACTS)}") from None
