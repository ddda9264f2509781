"""LoRAs fused into the weights before export (`edge-convert --lora FILE[:SCALE]`).

Each file is read and matched against the checkpoint's parameter names and shapes (from the
safetensors headers, before anything is exported), then fused into the UNet and text encoder
as they are loaded: `W += scale * alpha / rank * up @ down` (edge_sdk.lora, the same
arithmetic a load-time LoRA uses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edge_sdk import names as N
from edge_sdk.errors import ConversionError, LoraError, SafetensorsError
from edge_sdk.lora import LoraLayer, param_key, read_lora
from edge_sdk.manifest import sha256_file
from edge_sdk.safetensors_file import read_header

log = logging.getLogger(__name__)

# checkpoint folder of each component a LoRA can change
LORA_COMPONENTS = {N.UNET: "unet", N.TEXT_ENCODER: "text_encoder"}


@dataclass(frozen=True)
class Lora:
    """One --lora: the file, its scale and its layers."""

    path: Path
    scale: float
    layers: tuple[LoraLayer, ...]

    def describe(self) -> dict[str, Any]:
        """What the manifest records of it."""
        return {"file": self.path.name, "sha256": sha256_file(self.path),
                "scale": self.scale, "layers": len(self.layers)}


def parameter_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """{parameter name: shape} of a component folder's safetensors weights (None: it has
    only pickle weights)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        header, _ = read_header(f)
        shapes.update({param_key(k): tuple(v["shape"]) for k, v in header.items()})
    return shapes


def read_loras(ckpt: Any, specs: Sequence[tuple[str | Path, float]]) -> list[Lora]:
    """Each (file, scale) read and checked against the checkpoint (its
    `parameter_shapes(folder)`): every key matched to a weight of the right shape, or a
    ConversionError naming the problem."""
    if not specs:
        return []
    shapes = {}
    for component, folder in LORA_COMPONENTS.items():
        found = ckpt.parameter_shapes(folder)
        if found is None:
            raise ConversionError(f"--lora: {ckpt.path / folder} has only pickle weights; a "
                                  "LoRA is matched against the checkpoint's .safetensors "
                                  "weights: convert them to safetensors first")
        shapes[component] = found
    names = {c: list(s) for c, s in shapes.items()}
    out = []
    for path, scale in specs:
        path = Path(path)
        try:
            if path.suffix != ".safetensors":
                raise LoraError(f"--lora {path}: not a .safetensors file; LoRAs are read from "
                                "safetensors only (convert a .pt/.ckpt one to safetensors)")
            layers = read_lora(path, names)
            for layer in layers:
                layer.check(shapes[layer.component][layer.param], str(path))
        except (LoraError, SafetensorsError, OSError) as exc:
            raise ConversionError(f"--lora: {exc}") from exc
        out.append(Lora(path, float(scale), tuple(layers)))
    return out


def fuse_loras(model: Any, component: str, loras: Sequence[Lora]) -> None:
    """Add each LoRA's change to `model`'s weights in place (torch, fp32)."""
    import torch
    if not loras:
        return
    params = {param_key(n): p for n, p in model.named_parameters()}
    changed = 0
    for lora in loras:
        for layer in lora.layers:
            if layer.component != component:
                continue
            p = params.get(layer.param)
            if p is None:
                raise ConversionError(f"--lora {lora.path}: {layer.param} is not a parameter "
                                      f"of the {component}")
            try:
                delta = layer.delta(lora.scale, tuple(p.shape), str(lora.path))
            except LoraError as exc:
                raise ConversionError(f"--lora: {exc}") from exc
            with torch.no_grad():
                p.add_(torch.from_numpy(delta).to(p.dtype))
            changed += 1
    log.info("LoRA: %d %s weights changed", changed, component)
