"""The UNet graphs feature caching needs (DeepCache, Ma et al. 2023, arXiv 2312.00858).

Adjacent denoising steps change a UNet's deep features little. DeepCache runs the whole UNet
every N-th step and keeps the hidden state that enters the last up block at a fixed layer;
in between it runs only a shallow branch: the input convolution, the first `layers` layers
of the first down block, the up block's layers from that point on (fed the cached state and
the shallow skips) and the output head. Two graphs serve it:

- the UNet graph with one more output, `deep_features` (the cached state), which the
  runtime fetches only on the full steps (an output it does not ask for costs nothing);
- `unet_shallow`: the shallow branch, taking the UNet's inputs and `deep_features`.

`layers=1` is DeepCache's default for SD 1.5 (its cache_layer_id 0, cache_block_id 0): the
branch keeps 3 of the 16 transformer blocks, all at full latent resolution. Given the
deep features the full graph wrote for the same inputs, the shallow graph reproduces the
full UNet's output exactly (a test checks it), so the only error is the features' age.
"""

from __future__ import annotations

from typing import Any

from edge_sdk import contracts as C
from edge_sdk.contracts import UnetIO
from edge_sdk.errors import ConversionError

from .checkpoint import Checkpoint
from .registry import Exporter, _unet_example, _unet_optional

DEFAULT_LAYERS = 1  # DeepCache's SD 1.5 setting: one layer of the first down block
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def cache_problem(unet_cfg: dict[str, Any], layers: int = DEFAULT_LAYERS) -> str | None:
    """Why a UNet of this config cannot be split for feature caching, or None."""
    down, up = list(unet_cfg.get("down_block_types", ())), list(unet_cfg.get("up_block_types",
                                                                              ()))
    if not down or down[0] not in DOWN_BLOCKS or not up or up[-1] not in UP_BLOCKS:
        return (f"its first down block is {down[:1]} and last up block {up[-1:]}; the split "
                f"is made for {list(DOWN_BLOCKS)} / {list(UP_BLOCKS)}")
    per_block = unet_cfg.get("layers_per_block", 2)
    per_block = per_block[0] if isinstance(per_block, (list, tuple)) else per_block
    if not 1 <= layers <= int(per_block):
        return f"it caches after {layers} layers, the first down block has {per_block}"
    if layers == int(per_block) and len(down) < 2:
        return "it has a single level: no up block before the last one to cache from"
    if unet_cfg.get("class_embed_type") or unet_cfg.get("num_class_embeds"):
        return "it takes class labels (class_embed_type / num_class_embeds)"
    if unet_cfg.get("addition_embed_type") == "text_time":
        return "SDXL's added conditions enter its time embedding; the split does not carry them"
    if unet_cfg.get("addition_embed_type") == "image_hint":
        return "its hint image (addition_embed_type 'image_hint') enters every step"
    if unet_cfg.get("center_input_sample"):
        return "it centres its input sample (center_input_sample)"
    return None


def _embeddings(m: Any, sample: Any, timestep: Any, context: Any, timestep_cond: Any
                ) -> tuple[Any, Any]:
    """The time embedding (with the caption's, for addition_embed_type 'text') and the
    cross-attention context, as UNet2DConditionModel.forward makes them."""
    emb = m.time_embedding(m.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    aug = m.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs={})
    emb = emb + aug if aug is not None else emb
    if m.time_embed_act is not None:
        emb = m.time_embed_act(emb)
    return emb, m.process_encoder_hidden_states(encoder_hidden_states=context,
                                                added_cond_kwargs={})


def _layer(block: Any, j: int, h: Any, emb: Any, context: Any) -> Any:
    h = block.resnets[j](h, emb)
    if getattr(block, "attentions", None) is not None and len(block.attentions) > j:
        h = block.attentions[j](h, encoder_hidden_states=context, return_dict=False)[0]
    return h


def shallow_forward(m: Any, sample: Any, timestep: Any, context: Any, deep: Any,
                    timestep_cond: Any = None, layers: int = DEFAULT_LAYERS) -> Any:
    """The shallow branch: the UNet's output from its inputs and the cached `deep`
    features (the state entering the last up block's layer `n_up - layers - 1`)."""
    import torch
    emb, context = _embeddings(m, sample, timestep, context, timestep_cond)
    h = m.conv_in(sample)
    skips = [h]
    down = m.down_blocks[0]
    for j in range(layers):
        h = _layer(down, j, h, emb, context)
        skips.append(h)
    up = m.up_blocks[-1]
    h = deep
    for j in range(len(up.resnets) - layers - 1, len(up.resnets)):
        h = _layer(up, j, torch.cat([h, skips.pop()], dim=1), emb, context)
    if m.conv_norm_out is not None:
        h = m.conv_act(m.conv_norm_out(h))
    return m.conv_out(h)


def _tap(m: Any, layers: int) -> Any:
    """The module whose output is the cached state: the last up block's layer before the
    shallow ones (its attention, else its resnet), or the up block before it."""
    up = m.up_blocks[-1]
    j = len(up.resnets) - layers - 2
    if j < 0:
        return m.up_blocks[-2]
    attn = getattr(up, "attentions", None)
    return attn[j] if attn is not None and len(attn) > j else up.resnets[j]


def _cached_unet_wrap(layers: int) -> Any:
    def wrap(model: Any) -> Any:
        import torch

        class CachedUnet(torch.nn.Module):
            """The UNet with its deep features as a second output."""

            def __init__(self) -> None:
                super().__init__()
                self.m = model  # the same parameter names as the plain UNet's graph
                self._deep: list[Any] = []
                _tap(model, layers).register_forward_hook(
                    lambda _mod, _inp, out: self._deep.append(
                        out[0] if isinstance(out, tuple) else out))

            def forward(self, sample: Any, timestep: Any, context: Any,
                        timestep_cond: Any = None) -> Any:
                self._deep.clear()
                out = self.m(sample, timestep, context, timestep_cond=timestep_cond,
                             return_dict=False)[0]
                return out, self._deep[-1]
        return CachedUnet().eval()
    return wrap


def _shallow_wrap(layers: int) -> Any:
    def wrap(model: Any) -> Any:
        import torch

        class ShallowUnet(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, sample: Any, timestep: Any, context: Any, deep: Any,
                        timestep_cond: Any = None) -> Any:
                return shallow_forward(self.m, sample, timestep, context, deep,
                                       timestep_cond, layers)
        return ShallowUnet().eval()
    return wrap


def _shallow_example(layers: int) -> Any:
    def example(model: Any, batch: int, size: Any, shapes: Any) -> dict[str, Any]:
        import torch
        out = _unet_example(model, batch, size, shapes)
        s = out[UnetIO.SAMPLE]
        channels = deep_channels(model.config, layers)
        out[UnetIO.DEEP_FEATURES] = torch.randn(s.shape[0], channels, *s.shape[2:])
        return out
    return example


def deep_channels(cfg: Any, layers: int = DEFAULT_LAYERS) -> int:
    """Channels of the cached state: the first level's, or (cached at the up block's
    entrance) the second level's."""
    per_block = cfg["layers_per_block"] if isinstance(cfg, dict) else cfg.layers_per_block
    per_block = per_block[0] if isinstance(per_block, (list, tuple)) else per_block
    ch = list(cfg["block_out_channels"] if isinstance(cfg, dict) else cfg.block_out_channels)
    return int(ch[1] if layers == per_block and len(ch) > 1 else ch[0])


def _checked_load(layers: int) -> Any:
    def load(ckpt: Checkpoint) -> Any:
        problem = cache_problem(ckpt.config("unet"), layers)
        if problem is not None:
            raise ConversionError(f"feature caching: this UNet cannot be split ({problem}); "
                                  "convert with --no-feature-cache")
        return ckpt.load_unet()
    return load


def cached_unet_exporter(layers: int = DEFAULT_LAYERS) -> Exporter:
    """The UNet's exporter with the `deep_features` output."""
    return Exporter(C.UNET, _checked_load(layers), _cached_unet_wrap(layers), _unet_example,
                    optional=_unet_optional,
                    optional_outputs=lambda model: (UnetIO.DEEP_FEATURES,))


def shallow_exporter(layers: int = DEFAULT_LAYERS) -> Exporter:
    """The shallow branch's exporter (role unet_shallow)."""
    return Exporter(C.UNET_SHALLOW, _checked_load(layers), _shallow_wrap(layers),
                    _shallow_example(layers),
                    # always traced with the context: the exporter drops it where unused
                    optional=lambda model: (UnetIO.CONTEXT,) + _unet_optional(model))
