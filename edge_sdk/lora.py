"""LoRA files: which weights they change and by how much, in numpy.

Two key conventions are read:
- kohya / A1111: `lora_unet_<module>` and `lora_te_<module>` (the module's dotted path with
  `_` for `.`), `.lora_down.weight`, `.lora_up.weight` and `.alpha`;
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (or the older
  `.lora.down.weight` / `.lora.up.weight`, or `...processor.to_q_lora.down.weight`), with
  `text_encoder.` for the text encoder, and an optional `.alpha`.

A layer's change is `scale * alpha / rank * up @ down` (alpha defaults to the rank), reshaped
to the weight (1x1 and kxk convolutions too). Both the converter (fusing into torch modules)
and the runtime (new values for a bundle's mapped initializers) use these functions, so the
two give the same weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from . import names as N
from .errors import LoraError
from .safetensors_file import read_tensors


# the components a LoRA may change, by the prefixes of both conventions
KOHYA_PREFIXES = {"lora_unet_": N.UNET, "lora_te_": N.TEXT_ENCODER, "lora_te1_": N.TEXT_ENCODER}
PEFT_PREFIXES = {"unet.": N.UNET, "text_encoder.": N.TEXT_ENCODER}
_PEFT_PARTS = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
               ".lora.up.weight": "up", ".alpha": "alpha"}
_KOHYA_PARTS = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


@dataclass(frozen=True)
class LoraLayer:
    """One changed weight: its component and parameter name, and the low-rank factors."""

    component: str  # N.UNET | N.TEXT_ENCODER
    param: str  # the parameter's name in the checkpoint's module, e.g. "...to_q.weight"
    up: np.ndarray  # [out, rank, (1, 1)]
    down: np.ndarray  # [rank, in, (kh, kw)]
    alpha: float

    def check(self, shape: tuple[int, ...], where: str) -> None:
        """A LoraError unless this layer's change has the weight's `shape`."""
        rank = self.down.shape[0]
        fits = self.up.ndim >= 2 and self.up.shape[1] == rank \
            and int(np.prod(self.up.shape[2:], dtype=np.int64)) == 1 \
            and len(shape) >= 2 and self.up.shape[0] == shape[0] \
            and int(np.prod(self.down.shape[1:])) == int(np.prod(shape[1:]))
        if not fits:
            raise LoraError(f"{where}: its layer for {self.component} {self.param} changes a "
                            f"{tuple(self.up.shape[:1]) + tuple(self.down.shape[1:])} weight, "
                            f"the model's is {tuple(shape)}: the LoRA was made for another "
                            "base model (e.g. SD 2.x against SD 1.x); use one made for this "
                            "model")

    def delta(self, scale: float, shape: tuple[int, ...], where: str) -> np.ndarray:
        """`scale * alpha / rank * up @ down` as a float32 array of the weight's `shape`."""
        self.check(shape, where)
        rank = self.down.shape[0]
        up = self.up.reshape(self.up.shape[0], rank).astype(np.float32)
        down = self.down.reshape(rank, -1).astype(np.float32)
        return (up @ down * np.float32(scale * self.alpha / rank)).reshape(shape)


def _split(key: str, parts: Mapping[str, str]) -> tuple[str, str] | None:
    for suffix, part in parts.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], part
    return None


def _module_index(params: Iterable[str]) -> dict[str, str]:
    """`a_b_c` (kohya's spelling) and `a.b.c` -> `a.b.c` for every weight's module; text
    encoders' modules also under `text_model.` (transformers 5 dropped that level)."""
    index: dict[str, str] = {}
    for p in params:
        if not p.endswith(".weight"):
            continue
        module = param_key(p)[:-len(".weight")]
        for name in (module, "text_model." + module):
            index[name] = index[name.replace(".", "_")] = module
    return index


def param_key(name: str) -> str:
    """A parameter's name as LoRA layers name it: a text encoder's without `text_model.`
    (transformers 5's modules drop that level; files written by earlier ones keep it)."""
    return name[len("text_model."):] if name.startswith("text_model.") else name


def read_lora(path: str | Path, params: Mapping[str, Iterable[str]],
              hint: str = "") -> list[LoraLayer]:
    """The layers of a LoRA file, each matched to a weight of `params` (component -> its
    parameter names). Keys of another kind, or matching no weight, are a LoraError naming a
    few of them (`hint`: what else may explain a key that matches none)."""
    path = Path(path)
    tensors = read_tensors(path)
    indexes = {c: _module_index(names) for c, names in params.items()}
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown, unmatched = [], []
    for key, value in tensors.items():
        found = _parse_key(key)
        if found is None:
            unknown.append(key)
            continue
        component, module, part = found
        target = indexes.get(component, {}).get(module)
        if target is None:
            unmatched.append(key)
            continue
        groups.setdefault((component, target), {})[part] = value
    _refuse(path, tensors, unknown, unmatched, params, hint)
    layers = []
    for (component, module), parts in sorted(groups.items()):
        if "up" not in parts or "down" not in parts:
            raise LoraError(f"{path}: the layer for {module} lacks its "
                            f"{'up' if 'up' not in parts else 'down'} matrix: the file is "
                            "incomplete")
        rank = parts["down"].shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        layers.append(LoraLayer(component, module + ".weight", parts["up"], parts["down"],
                                alpha))
    return layers


def _parse_key(key: str) -> tuple[str, str, str] | None:
    """(component, module path in either spelling, part) of a LoRA key, or None."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix) and (hit := _split(key[len(prefix):], _KOHYA_PARTS)):
            return component, hit[0], hit[1]
    for prefix, component in PEFT_PREFIXES.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if m := _PROCESSOR.search(rest):  # diffusers' attention-processor LoRAs
            layer = m.group(1) + (".0" if m.group(1) == "to_out" else "")
            return component, rest[:m.start()] + "." + layer, m.group(2)
        if hit := _split(rest, _PEFT_PARTS):
            return component, hit[0], hit[1]
    return None


def _refuse(path: Path, tensors: Mapping[str, np.ndarray], unknown: list[str],
            unmatched: list[str], params: Mapping[str, Iterable[str]], hint: str) -> None:
    if not tensors:
        raise LoraError(f"{path}: holds no tensors; not a LoRA")
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} of its {len(tensors)} keys are in no LoRA "
                        f"convention this reads (kohya/A1111 lora_unet_*/lora_te_* or "
                        f"diffusers/PEFT unet.*/text_encoder.* lora_A/lora_B), e.g. "
                        f"{unknown[:3]}; LoHa/LoKr/(IA)3, DoRA and Tucker-decomposed (lora_mid) "
                        "files are not supported")
    if unmatched:
        raise LoraError(f"{path}: {len(unmatched)} of its {len(tensors)} keys match no layer "
                        f"of this model's {'/'.join(sorted(params))}, e.g. {unmatched[:3]}: "
                        "the LoRA was made for another model family (e.g. SDXL) or "
                        f"architecture; use one made for this model{hint}")


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`FILE[:SCALE]` (a command-line --lora) -> (file, scale; 1.0 when not given)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", tail.strip()):
        return head, float(tail)
    return text, 1.0
