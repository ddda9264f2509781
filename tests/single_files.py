"""Single-file checkpoints for the tests: a diffusers folder written out in the original
Stable Diffusion layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`), as trainers and sharing sites publish models.

The renaming is written here from the original repositories' module names (openaimodel's
input/middle/output blocks and SDXL's label_emb, the autoencoder's down/mid/up, OpenCLIP's
resblocks; SDXL's conditioner.embedders), not taken
from diffusers, whose conversion in the other direction is what the tests check. It works
on numpy arrays (files) and on torch meta tensors (full-size layouts without the memory).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .lora_files import folder_weights

_UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."),
                ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."),
                ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                  ("to_out.0.", "proj_out."))
_OPEN_CLIP_LAYER = (("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."),
                    ("self_attn.out_proj.", "attn.out_proj."))


def _rename(key: str, rules: list[tuple[str, str, tuple[tuple[str, str], ...]]]) -> str:
    """`key` under the longest matching prefix rule, its remainder renamed by the rule's
    inner pairs."""
    best = max((r for r in rules if key.startswith(r[0])), key=lambda r: len(r[0]),
               default=None)
    if best is None:
        raise KeyError(f"no original name for {key}")
    rest = key[len(best[0]):]
    for new, old in best[2]:
        if rest.startswith(new):
            rest = old + rest[len(new):]
    return best[1] + rest


def unet_rules(cfg: Mapping[str, Any]) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    levels, n = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    rules = [("time_embedding.linear_1.", "time_embed.0.", ()),
             ("time_embedding.linear_2.", "time_embed.2.", ()),
             ("conv_in.", "input_blocks.0.0.", ()), ("conv_norm_out.", "out.0.", ()),
             ("conv_out.", "out.2.", ()),
             ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
             ("mid_block.attentions.0.", "middle_block.1.", ()),
             ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    if cfg.get("addition_embed_type") == "text_time":  # SDXL's added conditions
        rules += [("add_embedding.linear_1.", "label_emb.0.0.", ()),
                  ("add_embedding.linear_2.", "label_emb.0.2.", ())]
    for i in range(levels):
        for j in range(n):
            k = 1 + i * (n + 1) + j
            rules += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{k}.0.", _UNET_RESNET),
                      (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{k}.1.", ())]
        for j in range(n + 1):
            k = i * (n + 1) + j
            rules += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{k}.0.", _UNET_RESNET),
                      (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{k}.1.", ())]
        if i < levels - 1:
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.",
                          f"input_blocks.{(n + 1) * (i + 1)}.0.op.", ()))
            # the upsampler follows the level's last resnet, and its attention if it has one
            after = 2 if "CrossAttn" in cfg["up_block_types"][i] else 1
            rules.append((f"up_blocks.{i}.upsamplers.0.",
                          f"output_blocks.{i * (n + 1) + n}.{after}.", ()))
    return rules


def vae_rules(cfg: Mapping[str, Any]) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    levels, n = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    resnet = (("conv_shortcut.", "nin_shortcut."),)
    rules = [("quant_conv.", "quant_conv.", ()), ("post_quant_conv.", "post_quant_conv.", ())]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.conv_in.", f"{part}.conv_in.", ()),
                  (f"{part}.conv_out.", f"{part}.conv_out.", ()),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", ()),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", resnet),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", resnet),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
    for i in range(levels):
        up = levels - 1 - i  # the decoder's levels are numbered from the bottom
        rules += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.",
                   resnet) for j in range(n)]
        rules += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.",
                   resnet) for j in range(n + 1)]
        rules += [(f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                   f"encoder.down.{i}.downsample.conv.", ()),
                  (f"decoder.up_blocks.{i}.upsamplers.0.conv.",
                   f"decoder.up.{up}.upsample.conv.", ())]
    return rules


def unet_to_original(weights: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    rules = unet_rules(cfg)
    return {"model.diffusion_model." + _rename(k, rules): v for k, v in weights.items()}


def controlnet_to_original(weights: Mapping[str, Any], cfg: Mapping[str, Any]
                           ) -> dict[str, Any]:
    """A ControlNetModel's weights as the original ControlNet (cldm) names them: the UNet
    encoder's under `control_model.`, the zero convolutions `zero_convs.N.0` and
    `middle_block_out.0`, the hint encoder `input_hint_block.N` (a SiLU between its
    convolutions, so every other index)."""
    blocks = 2 * (len(cfg["conditioning_embedding_out_channels"]) - 1)
    rules = unet_rules(cfg) + [
        ("controlnet_mid_block.", "middle_block_out.0.", ()),
        ("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", ()),
        ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * (blocks + 1)}.", ())]
    rules += [(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", ()) for i in range(32)]
    rules += [(f"controlnet_cond_embedding.blocks.{j}.", f"input_hint_block.{2 * (j + 1)}.",
               ()) for j in range(blocks)]
    return {"control_model." + _rename(k, rules): v for k, v in weights.items()}


def vae_to_original(weights: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    rules, out = vae_rules(cfg), {}
    for k, v in weights.items():
        name = _rename(k, rules)
        if ".mid.attn_1." in name and name.endswith("weight") and len(v.shape) == 2:
            v = v.reshape(*v.shape, 1, 1)  # the original attention's 1x1 convolutions
        out["first_stage_model." + name] = v
    return out


def clip_to_original(weights: Mapping[str, Any],
                     prefix: str = "cond_stage_model.transformer.") -> dict[str, Any]:
    """SD 1.x (SDXL's first encoder: another prefix): transformers' CLIP names (as
    transformers 4 wrote them) under a prefix."""
    out = {prefix + "text_model." + k.removeprefix("text_model."): v
           for k, v in weights.items()}
    out[prefix + "text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    return out


def open_clip_to_original(weights: Mapping[str, Any], projection: Any,
                          extra_layers: int = 0, p: str = "cond_stage_model.model."
                          ) -> dict[str, Any]:
    """SD 2.x (SDXL's second encoder: prefix `p`): OpenCLIP's text tower, q/k/v joined into
    one in_proj per layer. `projection` is the tower's text_projection (x @ projection);
    `extra_layers` more resblocks are written (copies of the last) as SD 2.x files hold 24
    where the model uses 23."""
    w = {k.removeprefix("text_model."): v for k, v in weights.items()
         if not k.startswith("text_projection")}
    out = {p + "token_embedding.weight": w["embeddings.token_embedding.weight"],
           p + "positional_embedding": w["embeddings.position_embedding.weight"],
           p + "ln_final.weight": w["final_layer_norm.weight"],
           p + "ln_final.bias": w["final_layer_norm.bias"], p + "text_projection": projection}
    layers = sorted({int(k.split(".")[2]) for k in w if k.startswith("encoder.layers.")})
    for i in layers + [layers[-1]] * extra_layers:
        src, dst = f"encoder.layers.{i}.", f"{p}transformer.resblocks.{_index(out, p)}."
        for new, old in _OPEN_CLIP_LAYER:
            for kind in ("weight", "bias"):
                out[dst + old + kind] = w[src + new + kind]
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = _cat(
                [w[src + f"self_attn.{q}_proj.{kind}"] for q in "qkv"])
    return out


def _index(out: Mapping[str, Any], prefix: str) -> int:
    """The next resblock number."""
    head = prefix + "transformer.resblocks."
    done = {k[len(head):].split(".")[0] for k in out if k.startswith(head)}
    return len(done)


def _cat(parts: list[Any]) -> Any:
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    import torch
    return torch.cat(parts)


def original_layout(family: str, prediction: str = "epsilon") -> tuple[Any, Any, Any]:
    """The configs, the meta-device models they build and those models' weights under
    their original-layout names (an SD 2.x file's 24th text block included)."""
    import torch

    from converters.single_file import family_configs
    from converters.single_file_weights import empty_model
    configs = family_configs(family, prediction)
    names = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if "text_encoder_2" in
                                               configs else ())
    models = {n: empty_model(n, configs[n]) for n in names}
    state = {n: m.state_dict() for n, m in models.items()}
    if "text_encoder_2" in state:
        out = {"unet": unet_to_original(state["unet"], configs["unet"]),
               "vae": vae_to_original(state["vae"], configs["vae"])}
        out.update(_xl_text(state["text_encoder"], state["text_encoder_2"]))
        return configs, models, out
    if family.startswith("sd2"):
        te = open_clip_to_original(state["text_encoder"],
                                   torch.empty(1024, 1024, device="meta"), 1)
    else:
        te = clip_to_original(state["text_encoder"])
    return configs, models, {"unet": unet_to_original(state["unet"], configs["unet"]),
                             "vae": vae_to_original(state["vae"], configs["vae"]),
                             "text_encoder": te}


XL_CLIP, XL_OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def _xl_text(te: Mapping[str, Any], te2: Mapping[str, Any]) -> dict[str, Any]:
    """SDXL's two text encoders in the original layout (the second's projection stored as
    OpenCLIP's x @ P, the transpose of transformers' Linear weight)."""
    return {"text_encoder": clip_to_original(te, XL_CLIP),
            "text_encoder_2": open_clip_to_original(te2, te2["text_projection.weight"].T,
                                                    p=XL_OPEN_CLIP)}


def layout_shapes(original: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for part in original.values() for k, v in part.items()}


def sparse_file(path: Path, shapes: Mapping[str, tuple[int, ...]],
                metadata: Mapping[str, str] | None = None) -> Path:
    """A .safetensors file with these tensors' header and sparse (unwritten) zero data."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset,
                                                                               offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def write_single_file(ckpt: Path, out: Path, text: str = "clip", dtype: Any = None,
                      metadata: Mapping[str, str] | None = None, vae: bool = True,
                      extra_text_layers: int = 0) -> Path:
    """The diffusers folder `ckpt` as one original-layout .safetensors file (`text`: "clip"
    for SD 1.x's text encoder layout, "open_clip" for SD 2.x's, with `extra_text_layers`
    unused blocks, "sdxl" for SDXL's two; `dtype`: cast floats)."""
    from safetensors.numpy import save_file
    cfg = {n: json.loads((ckpt / n / "config.json").read_text()) for n in ("unet", "vae")}
    tensors = unet_to_original(folder_weights(ckpt, "unet"), cfg["unet"])
    if vae:
        tensors.update(vae_to_original(folder_weights(ckpt, "vae"), cfg["vae"]))
    te = folder_weights(ckpt, "text_encoder")
    if text == "sdxl":
        for part in _xl_text(te, folder_weights(ckpt, "text_encoder_2")).values():
            tensors.update(part)
    elif text == "clip":
        tensors.update(clip_to_original(te))
    else:
        width = te[next(k for k in te if k.endswith("token_embedding.weight"))].shape[1]
        rng = np.random.default_rng(0)
        tensors.update(open_clip_to_original(
            te, rng.standard_normal((width, width)).astype(np.float32), extra_text_layers))
    if dtype is not None:
        tensors = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out),
              metadata=dict(metadata or {}))
    return out
