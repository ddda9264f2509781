"""One exporter per component kind: how to load it from a checkpoint, the torch module that
exposes it with its contract's inputs and outputs (edge_sdk.contracts), and the example
tensors to trace it with. export_onnx and export_tflite take an entry and a format's rules;
convert() walks the bundle's roles and never branches on kind x format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from edge_sdk import contracts as C
from edge_sdk import names as N
from edge_sdk.contracts import TextEncoderIO, UnetIO, VaeIO

from .checkpoint import Checkpoint


@dataclass(frozen=True)
class Shapes:
    """The sizes a trace needs beyond the model's own config."""

    text_len: int  # the text encoder's token count (the UNet's context length)
    context_dim: int  # the UNet's cross-attention width
    vae_factor: int  # image pixels per latent pixel


@dataclass(frozen=True)
class Exporter:
    contract: C.ComponentContract
    load: Callable[[Checkpoint], Any]  # the torch module, fp32, eval mode
    wrap: Callable[[Any], Any]  # -> a module whose forward takes the contract's inputs
    # (model, batch, image (height, width) or None for "any small size", shapes) -> inputs
    example: Callable[[Any, int, "tuple[int, int] | None", Shapes], dict[str, Any]]
    sized: bool = True  # TFLite: one signature per image size
    # the optional contract inputs this model's graph takes (an LCM UNet's timestep_cond)
    optional: Callable[[Any], tuple[str, ...]] = lambda model: ()
    # the optional contract outputs this export adds (the UNet's deep features)
    optional_outputs: Callable[[Any], tuple[str, ...]] = lambda model: ()

    def input_names(self, model: Any) -> list[str]:
        """The graph's inputs, in order: the contract's required ones, then its optional
        ones that `model` has."""
        extra = self.optional(model)
        return [t.name for t in self.contract.inputs if not t.optional or t.name in extra]

    def output_names(self, model: Any) -> list[str]:
        """The graph's outputs, in order: the contract's required ones, then the optional
        ones this export adds."""
        extra = self.optional_outputs(model)
        return [t.name for t in self.contract.outputs if not t.optional or t.name in extra]


def _module(forward: Callable[..., Any]) -> Callable[[Any], Any]:
    """A wrapper class whose forward(self, *inputs) is `forward(model, *inputs)`."""
    def wrap(model: Any) -> Any:
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model  # the prefix "m." of every parameter name in the graph

            def forward(self, *inputs: Any) -> Any:
                return forward(self.m, *inputs)
        return Wrapper().eval()
    return wrap


def _text(m: Any, input_ids: Any) -> Any:
    import torch
    out = m(input_ids=input_ids, output_hidden_states=True, return_dict=True)
    norm = getattr(m, "text_model", m).final_layer_norm  # (transformers 5 flattened it)
    layers = torch.stack([norm(h) for h in out.hidden_states[:-1]], dim=1)
    return out.last_hidden_state, out.pooler_output, layers


def _text_xl(m: Any, input_ids: Any) -> Any:
    """SDXL's text encoders: every layer's input as it is (SDXL reads the penultimate one,
    not through the final LayerNorm), and the second's projected pooled output."""
    import torch
    text = getattr(m, "text_model", m)
    out = text(input_ids=input_ids, output_hidden_states=True, return_dict=True)
    layers = torch.stack(out.hidden_states[:-1], dim=1)
    if hasattr(m, "text_projection"):  # CLIPTextModelWithProjection
        return (out.last_hidden_state, out.pooler_output, layers,
                m.text_projection(out.pooler_output))
    return out.last_hidden_state, out.pooler_output, layers


def _text_xl_outputs(model: Any) -> tuple[str, ...]:
    return (TextEncoderIO.HIDDEN_LAYERS,) + (
        (TextEncoderIO.TEXT_EMBEDS,) if hasattr(model, "text_projection") else ())


def _unet(m: Any, sample: Any, timestep: Any, context: Any, *optional: Any) -> Any:
    given = dict(zip(_unet_optional(m), optional))  # in the contract's order
    added = {k: given[k] for k in (UnetIO.TEXT_EMBEDS, UnetIO.TIME_IDS) if k in given}
    return m(sample, timestep, context, timestep_cond=given.get(UnetIO.TIMESTEP_COND),
             added_cond_kwargs=added or None, return_dict=False)[0]


def _unet_optional(model: Any) -> tuple[str, ...]:
    """An LCM-distilled UNet takes the guidance embedding (time_cond_proj_dim wide); an
    SDXL UNet its added conditions (the pooled text embeddings and the time ids)."""
    cfg = model.config
    return ((UnetIO.TIMESTEP_COND,) if cfg.get("time_cond_proj_dim") else ()) + (
        (UnetIO.TEXT_EMBEDS, UnetIO.TIME_IDS) if cfg.get("addition_embed_type") == "text_time"
        else ())


def _decode(m: Any, latents: Any) -> Any:
    return m.decode(latents, return_dict=False)[0]


def _decode_tiny(m: Any, latents: Any) -> Any:
    return m.decode(latents, return_dict=False)[0]  # DecoderTiny: [-1, 1], as the full one


def _encode(m: Any, image: Any) -> Any:
    import torch
    h = m.encoder(image)
    moments = m.quant_conv(h) if m.quant_conv is not None else h
    mean, logvar = torch.chunk(moments, 2, dim=1)
    return mean, torch.clamp(logvar, -30.0, 20.0)  # as DiagonalGaussianDistribution


def _latent_hw(cfg: Any, size: tuple[int, int] | None, factor: int) -> tuple[int, int]:
    if size is not None:
        return size[0] // factor, size[1] // factor
    return 4, 6  # small and not square: a trace that mixes up height and width fails


def _text_example(model: Any, batch: int, size: Any, s: Shapes) -> dict[str, Any]:
    import torch
    cfg = model.config
    return {TextEncoderIO.INPUT_IDS: torch.full((batch, s.text_len), cfg.eos_token_id,
                                                dtype=torch.int64)}


def _unet_example(model: Any, batch: int, size: tuple[int, int] | None,
                  s: Shapes) -> dict[str, Any]:
    import torch
    cfg = model.config
    if size is None:
        # Odd latent sides: diffusers' UNet then hands each upsampler its skip connection's
        # size (`forward_upsample_size`), a path the trace keeps, so the graph serves every
        # latent size (104x72 px on a 3-level UNet: 13x9 latents), not only multiples of
        # the UNet's whole downsampling. Any context length.
        side = 2 ** (len(cfg.block_out_channels) - 1) * 2 + 1
        hw, ctx_len, t = (side, side + side // 2), 7, torch.tensor([999.0, 500.0][:batch])
    else:
        hw, ctx_len, t = (size[0] // s.vae_factor, size[1] // s.vae_factor), s.text_len, \
            torch.tensor([999.0] * batch)
    out = {UnetIO.SAMPLE: torch.randn(batch, cfg.in_channels, *hw), UnetIO.TIMESTEP: t,
           UnetIO.CONTEXT: torch.randn(batch, ctx_len, s.context_dim)}
    if cfg.get("time_cond_proj_dim"):
        out[UnetIO.TIMESTEP_COND] = torch.randn(batch, int(cfg.time_cond_proj_dim))
    if cfg.get("addition_embed_type") == "text_time":
        from .checkpoint import XL_TIME_IDS
        pooled = int(cfg.projection_class_embeddings_input_dim) \
            - XL_TIME_IDS * int(cfg.addition_time_embed_dim)
        out[UnetIO.TEXT_EMBEDS] = torch.randn(batch, pooled)
        side = [float(d * s.vae_factor) for d in hw]
        out[UnetIO.TIME_IDS] = torch.tensor([side + [0.0, 0.0] + side] * batch)
    return out


def _decoder_example(model: Any, batch: int, size: Any, s: Shapes) -> dict[str, Any]:
    import torch
    cfg = model.config
    return {VaeIO.LATENTS: torch.randn(batch, cfg.latent_channels,
                                       *_latent_hw(cfg, size, s.vae_factor))}


def _encoder_example(model: Any, batch: int, size: Any, s: Shapes) -> dict[str, Any]:
    import torch
    cfg = model.config
    h, w = _latent_hw(cfg, size, s.vae_factor)
    return {VaeIO.IMAGE: torch.randn(batch, cfg.in_channels, h * s.vae_factor,
                                     w * s.vae_factor)}


EXPORTERS: dict[str, Exporter] = {e.contract.kind: e for e in (
    Exporter(C.TEXT_ENCODER, Checkpoint.load_text_encoder, _module(_text), _text_example,
             sized=False, optional_outputs=lambda model: (TextEncoderIO.LAYER_STATES,)),
    Exporter(C.UNET, Checkpoint.load_unet, _module(_unet), _unet_example,
             optional=_unet_optional),
    Exporter(C.VAE_DECODER, Checkpoint.load_vae, _module(_decode), _decoder_example),
    Exporter(C.VAE_ENCODER, Checkpoint.load_vae, _module(_encode), _encoder_example),
)}


# SDXL's text encoders: the same contract, their layers read raw, the second's projection
XL_EXPORTERS: dict[str, Exporter] = {
    N.TEXT_ENCODER: Exporter(C.TEXT_ENCODER, Checkpoint.load_text_encoder, _module(_text_xl),
                             _text_example, sized=False, optional_outputs=_text_xl_outputs),
    N.TEXT_ENCODER_2: Exporter(C.TEXT_ENCODER, Checkpoint.load_text_encoder_2,
                               _module(_text_xl), _text_example, sized=False,
                               optional_outputs=_text_xl_outputs),
}


def exporter(role: str, xl: bool = False) -> Exporter:
    """The exporter of a standard role (`xl`: of an SDXL checkpoint)."""
    return XL_EXPORTERS[role] if xl and role in XL_EXPORTERS else EXPORTERS[role]


def load_tiny_vae(folder: Any, allow_pickle: bool = False) -> Any:
    """A diffusers AutoencoderTiny (TAESD) from its folder, fp32, eval mode."""
    import os

    from diffusers import AutoencoderTiny
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoencoderTiny.from_pretrained(folder, local_files_only=True,
                                           use_safetensors=not allow_pickle).float().eval()


def tiny_decoder_exporter(folder: Any, allow_pickle: bool = False) -> Exporter:
    """The tiny decoder's exporter: the full decoder's contract, its own weights."""
    return Exporter(C.VAE_DECODER, lambda _ckpt: load_tiny_vae(folder, allow_pickle),
                    _module(_decode_tiny), _decoder_example)
