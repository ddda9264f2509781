"""LoRA files for the tests: random low-rank changes of a checkpoint's attention projections,
written in the kohya/A1111 convention or the diffusers/PEFT one, and the reference they
are checked against (fused by hand in torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

# (component, module name suffixes a LoRA changes)
UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q",
                "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                "proj_in", "resnets.0.conv1")  # (convolutions: 1x1 in SD 1.x, and 3x3)
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                "self_attn.out_proj", "mlp.fc1")


def folder_weights(ckpt: Path, folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint component folder's safetensors files."""
    from safetensors.numpy import load_file
    out: dict[str, np.ndarray] = {}
    for f in sorted((ckpt / folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def modules(ckpt: Path, folder: str, targets: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """{module name: weight shape} of the checkpoint's modules ending in a target."""
    return {k[:-len(".weight")]: v.shape for k, v in folder_weights(ckpt, folder).items()
            if k.endswith(".weight") and k[:-len(".weight")].endswith(targets)}


def write_lora(ckpt: Path, out: Path, convention: str, unet: bool = True, text: bool = False,
               rank: int = 4, alpha: float | None = 2.0, seed: int = 0,
               strength: float = 0.3) -> Path:
    """A LoRA for `ckpt`'s UNet and/or text encoder in `convention` ("kohya" | "peft";
    `alpha`: kohya's, None for none)."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    parts = ([("unet", "lora_unet_", UNET_TARGETS)] if unet else []) + \
        ([("text_encoder", "lora_te_", TEXT_TARGETS)] if text else [])
    for folder, kohya, targets in parts:
        for module, shape in sorted(modules(ckpt, folder, targets).items()):
            # a convolution's LoRA: down a kxk conv to the rank, up a 1x1 one (kohya/PEFT)
            down = rng.standard_normal((rank, *shape[1:])).astype(np.float32) * strength
            up = rng.standard_normal((shape[0], rank, *[1] * (len(shape) - 2))
                                     ).astype(np.float32) * strength
            # text encoder LoRAs name its modules as transformers 4 did: text_model.encoder.*
            name = module if folder == "unet" or module.startswith("text_model.") \
                else "text_model." + module
            if convention == "kohya":
                key = kohya + name.replace(".", "_")
                tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"] = down, up
                if alpha is not None:
                    tensors[key + ".alpha"] = np.array(alpha, np.float32)
            else:
                key = f"{folder}.{name}"  # (diffusers' files carry no alpha: the rank)
                tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"] = down, up
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


def fused_checkpoint(ckpt: Path, out: Path, loras: list[tuple[Path, float]]) -> Path:
    """A copy of `ckpt` with the LoRAs fused by hand into its safetensors weights, by the
    definition W += scale * alpha / rank * B @ A (the reference for text-encoder LoRAs,
    which diffusers cannot load with the peft this index serves)."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(ckpt, out)
    for folder, prefixes in (("unet", ("lora_unet_", "unet.")),
                             ("text_encoder", ("lora_te_", "text_encoder."))):
        for f in sorted((out / folder).glob("*.safetensors")):
            weights = load_file(str(f))
            for path, scale in loras:
                _fuse_by_hand(weights, load_file(str(path)), prefixes, scale)
            save_file(weights, str(f), metadata={"format": "pt"})
    (out / "fused.json").write_text(json.dumps([[str(p), s] for p, s in loras]))
    return out


def _fuse_by_hand(weights: dict[str, np.ndarray], lora: dict[str, np.ndarray],
                  prefixes: tuple[str, str], scale: float) -> None:
    by_name = {}
    for name in weights:
        module = name[:-len(".weight")]
        by_name[prefixes[0] + module.replace(".", "_")] = name
        by_name[prefixes[0] + ("text_model." + module).replace(".", "_")] = name
        by_name[prefixes[1] + module] = by_name[prefixes[1] + "text_model." + module] = name
    for key in lora:
        for down_suffix, up_suffix in ((".lora_down.weight", ".lora_up.weight"),
                                       (".lora_A.weight", ".lora_B.weight")):
            if key.endswith(down_suffix) and key[:-len(down_suffix)] in by_name:
                base = key[:-len(down_suffix)]
                down, up = lora[key].astype(np.float64), lora[base + up_suffix]
                rank = down.shape[0]
                alpha = float(lora.get(base + ".alpha", rank))
                target = by_name[base]
                w = weights[target].astype(np.float64)
                product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
                w += scale * alpha / rank * product.reshape(w.shape)
                weights[target] = w.astype(weights[target].dtype)
