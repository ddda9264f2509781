"""LoRAs applied to a converted bundle at load time, without re-conversion.

Each graph of an fp32/fp16 ONNX bundle has a weight map (`<role>.weights.json`, written by
edge-convert): checkpoint parameter -> graph initializer (and whether the graph holds it
transposed, as MatMul weights are). A LoRA's changed weights are computed in numpy from the
mapped originals (edge_sdk.lora: the arithmetic conversion-time fusing uses) and handed to
onnxruntime as initializers that override the graph's (`SessionOptions.add_initializer`):
the rest stay mapped from the bundle, so memory grows by the changed tensors only.
Quantized (int8/int4) graphs and TFLite bundles take LoRAs at conversion only
(`edge-convert --lora`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from . import names as N
from .backends.onnx_files import check_external_data, float_initializers
from .errors import LoraError
from .lora import LoraLayer, param_key, read_lora
from .manifest import ComponentSpec, Manifest

log = logging.getLogger(__name__)

# which LoRA component each role's weights belong to (the shallow branch shares the UNet's)
ROLE_COMPONENT = {N.UNET: N.UNET, N.UNET_SHALLOW: N.UNET, N.TEXT_ENCODER: N.TEXT_ENCODER}
LOADABLE_PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class LoadedLora:
    """One LoRA file read for a bundle: its path, scale and layers."""

    path: Path
    scale: float
    layers: tuple[LoraLayer, ...]


def weight_map(bundle: Path, spec: ComponentSpec) -> dict[str, tuple[str, bool]]:
    """{parameter (param_key): (initializer, transposed)} of a component."""
    if spec.weight_map is None:
        raise LoraError(f"the bundle's {spec.name} has no weight map (converted by an older "
                        "edge-convert): re-convert it, or fuse the LoRA at conversion "
                        "(edge-convert --lora)")
    try:
        raw = json.loads((bundle / spec.weight_map).read_text())
    except (OSError, ValueError) as exc:
        raise LoraError(f"{bundle / spec.weight_map}: unreadable ({exc}); re-convert the "
                        "bundle") from exc
    return {param_key(k): (str(v[0]), bool(v[1])) for k, v in raw.items()}


def read_loras(bundle: Path, manifest: Manifest, loras: Mapping[str | Path, float]
               ) -> list[LoadedLora]:
    """Each LoRA file read and matched against the bundle's UNet and text encoder."""
    if not loras:
        return []
    check_loadable(manifest)
    params = {N.UNET: list(weight_map(bundle, manifest.components[N.UNET])),
              N.TEXT_ENCODER: list(weight_map(bundle, manifest.components[N.TEXT_ENCODER]))}
    out = []
    for path, scale in loras.items():
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not np.isfinite(scale):
            raise LoraError(f"LoRA {path}: scale {scale!r} is not a finite number")
        out.append(LoadedLora(Path(path), float(scale), tuple(read_lora(
            Path(path), params, hint=" (or, where it is this model's: the bundle's graphs hold "
            "those weights folded into others; fuse it at conversion, edge-convert --lora)"))))
    return out


def check_loadable(manifest: Manifest) -> None:
    """A LoraError unless every graph a LoRA changes is an fp32/fp16 ONNX one (and the
    model has one text encoder: SDXL LoRAs are not read yet)."""
    if len(manifest.text.encoders) > 1:
        raise LoraError("LoRAs on SDXL bundles are not supported yet (an SDXL LoRA names two "
                        "text encoders' layers and the UNet's in SDXL's layout); generate "
                        "without loras")
    for role in ROLE_COMPONENT:
        spec = manifest.components.get(role)
        if spec is None:
            continue
        if spec.format != "onnx" or spec.precision not in LOADABLE_PRECISIONS:
            raise LoraError(f"a LoRA at load time needs fp32/fp16 ONNX graphs; this bundle's "
                            f"{role} is {spec.format} {spec.precision}. Fuse the LoRA at "
                            "conversion instead: edge-convert CHECKPOINT -o BUNDLE --lora "
                            "FILE[:SCALE]")


def overrides(bundle: Path, spec: ComponentSpec, loras: list[LoadedLora],
              shared: dict[tuple[str, bool], np.ndarray] | None = None
              ) -> dict[str, np.ndarray]:
    """The changed initializers of one component (empty: nothing of it changes). `shared`:
    the arrays already made for other graphs, by (parameter, transposed): a graph that holds
    the same parameter (the UNet's shallow branch) gets the same array, not a copy."""
    shared = {} if shared is None else shared
    component = ROLE_COMPONENT.get(spec.name)
    layers = [(lora, layer) for lora in loras for layer in lora.layers
              if layer.component == component]
    if not layers:
        return {}
    path = bundle / spec.path
    check_external_data(path, {f.path for f in spec.files})
    wmap, inits = weight_map(bundle, spec), float_initializers(path)
    sums: dict[str, np.ndarray] = {}
    params: dict[str, tuple[str, bool]] = {}
    for lora, layer in layers:
        if layer.param not in wmap:
            if spec.name == N.UNET_SHALLOW:
                continue  # a layer of the deep part: not in the branch
            raise LoraError(f"LoRA {lora.path}: {layer.param} is folded into another weight "
                            f"in this bundle's {spec.name} graph, so it cannot change at "
                            "load time; fuse the LoRA at conversion (edge-convert --lora)")
        name, transposed = wmap[layer.param]
        init = inits.get(name)
        if init is None:
            raise LoraError(f"{spec.name}: the weight {name!r} of {layer.param} is not a float "
                            "tensor of the graph; re-convert the bundle")
        shape = init.shape[::-1] if transposed else init.shape
        delta = layer.delta(lora.scale, tuple(shape), str(lora.path))
        sums[name] = sums.get(name, 0) + (delta.T if transposed else delta)
        params[name] = (layer.param, transposed)
    out = {}
    for name, d in sums.items():
        key = params[name]
        if key not in shared:
            shared[key] = (inits[name].read(path.parent).astype(np.float32) + d).astype(
                inits[name].dtype)
        out[name] = shared[key]
    log.info("LoRA: %d %s weights changed (%.1f MiB)", len(out), spec.name,
             sum(a.nbytes for a in out.values()) / 2**20)
    return out


def bundle_overrides(bundle: Path, manifest: Manifest, loras: list[LoadedLora]
                     ) -> dict[str, dict[str, np.ndarray]]:
    """The changed initializers of each component a LoRA can change ({}: unchanged)."""
    shared: dict[tuple[str, bool], np.ndarray] = {}
    return {role: overrides(bundle, manifest.components[role], loras, shared)
            for role in ROLE_COMPONENT if role in manifest.components}
