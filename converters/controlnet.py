"""ControlNets into a bundle (`edge-convert CKPT -o B --controlnet PATH`, repeatable).

A ControlNet is read from a diffusers `ControlNetModel` folder or from a single file in the
original layout (`control_model.*`, or its keys bare as some are published), checked
against the base checkpoint's UNet (the same levels, layers and cross-attention width: a
ControlNet trained for another base would feed residuals of the wrong shapes), and exported
as role `controlnet_N` under the contract edge_sdk.contracts.CONTROLNET. The bundle's UNet
then takes the residuals as inputs (`controlled_unet_exporter`); the runtime feeds zeros
when a generation has no control image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from edge_sdk import contracts as C
from edge_sdk.contracts import ControlNetIO, UnetIO
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import ControlNetSpec

from .registry import Exporter, Shapes, _module, _unet_example
from .single_file_weights import check_suffix, header_shapes, read_tensors

log = logging.getLogger(__name__)

# what must agree between a ControlNet and the base UNet for its residuals to fit
MATCHING = ("block_out_channels", "layers_per_block", "cross_attention_dim",
            "down_block_types", "addition_embed_type")
ORIGINAL_PREFIX = "control_model."


@dataclass(frozen=True)
class ControlNetSource:
    """A ControlNet given for conversion: where, its name, fingerprint and config."""

    path: Path
    name: str
    fingerprint: str
    config: Mapping[str, Any] = field(default_factory=dict)
    single_file: bool = False
    allow_pickle: bool = False

    def spec(self, role: str) -> ControlNetSpec:
        return ControlNetSpec(role, self.name, self.fingerprint,
                              int(self.config.get("conditioning_channels", 3)),
                              bool(self.config.get("global_pool_conditions", False)))


def residual_layout(unet_cfg: Mapping[str, Any]) -> tuple[tuple[int, int], ...]:
    """(channels, downscale) of each skip of a UNet2DConditionModel's down path (the input
    convolution's, each layer's, each downsampler's), then of its middle block."""
    ch = [int(c) for c in unet_cfg["block_out_channels"]]
    per = unet_cfg.get("layers_per_block", 2)
    per = list(per) if isinstance(per, (list, tuple)) else [per] * len(ch)
    out, down = [(ch[0], 1)], 1
    for i, c in enumerate(ch):
        out += [(c, down)] * int(per[i])
        if i < len(ch) - 1:
            down *= 2
            out.append((c, down))
    return tuple(out + [(ch[-1], down)])


def read_controlnet(path: str | Path, unet_cfg: Mapping[str, Any], latent_channels: int,
                    allow_pickle: bool = False) -> ControlNetSource:
    """A --controlnet PATH read (its config, or for a single file the config derived from
    the base UNet's and the file's shapes) and checked against the base UNet."""
    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConversionError(f"--controlnet {path}: no config.json; give a diffusers "
                                  "ControlNetModel folder or a single .safetensors file")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConversionError(f"--controlnet {cfg_file}: unreadable ({exc})") from exc
        if cfg.get("_class_name") not in (None, "ControlNetModel"):
            raise ConversionError(f"--controlnet {path} is a {cfg.get('_class_name')}, not a "
                                  "ControlNetModel (SD 1.x/2.x ControlNets are converted)")
        source = ControlNetSource(path, path.name, _fingerprint(path), cfg, False, allow_pickle)
    elif path.is_file():
        check_suffix(path, allow_pickle, "--controlnet")
        cfg = single_file_config(header_shapes(path, allow_pickle), unet_cfg, latent_channels)
        source = ControlNetSource(path, path.stem, _fingerprint(path), cfg, True, allow_pickle)
    else:
        raise ConversionError(f"--controlnet {path} does not exist")
    check_matches(source, unet_cfg, latent_channels)
    return source


def check_matches(src: ControlNetSource, unet_cfg: Mapping[str, Any],
                  latent_channels: int) -> None:
    """A ControlNet for another base is refused, naming what differs."""
    cfg = src.config
    for key in MATCHING:
        mine, base = _norm(cfg.get(key)), _norm(unet_cfg.get(key))
        if key == "layers_per_block" and mine is None:
            mine = 2
        if mine != base:
            raise ConversionError(
                f"--controlnet {src.path}: it is made for another base model: its {key} is "
                f"{cfg.get(key)!r}, this checkpoint's UNet has {unet_cfg.get(key)!r} (e.g. an "
                "SD 2.x ControlNet, context width 1024, on an SD 1.x model, 768); give a "
                "ControlNet trained for this base")
    if int(cfg.get("in_channels", 4)) != latent_channels:
        raise ConversionError(f"--controlnet {src.path}: it takes {cfg.get('in_channels')} "
                              f"latent channels, this model's latents have {latent_channels}")
    if int(cfg.get("conditioning_channels", 3)) != 3:
        raise ConversionError(f"--controlnet {src.path}: its control image has "
                              f"{cfg.get('conditioning_channels')} channels; RGB (3) ones are "
                              "converted")
    if cfg.get("time_cond_proj_dim") or unet_cfg.get("time_cond_proj_dim"):
        raise ConversionError("--controlnet with an LCM-distilled UNet is not supported")
    if len(residual_layout(unet_cfg)) - 1 > C.MAX_DOWN_RESIDUALS:
        raise ConversionError(f"--controlnet: this UNet's down path has more than "
                              f"{C.MAX_DOWN_RESIDUALS} skips; ControlNets are converted for "
                              "SD 1.x/2.x UNets")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _bare(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """The original layout's keys without their `control_model.` prefix."""
    if any(k.startswith(ORIGINAL_PREFIX) for k in shapes):
        return {k[len(ORIGINAL_PREFIX):]: v for k, v in shapes.items()
                if k.startswith(ORIGINAL_PREFIX)}
    return dict(shapes)


def single_file_config(shapes: Mapping[str, tuple[int, ...]], unet_cfg: Mapping[str, Any],
                       latent_channels: int) -> dict[str, Any]:
    """A ControlNetModel config for an original-layout file: the base UNet's architecture
    (a ControlNet is a copy of its encoder), the hint encoder's channels from the file."""
    bare = _bare(shapes)
    if "input_hint_block.0.weight" not in bare or "time_embed.0.weight" not in bare:
        raise ConversionError("--controlnet: this file is not a ControlNet in the original "
                              "layout (no control_model.input_hint_block / time_embed); give "
                              "a diffusers ControlNetModel folder or an original ControlNet "
                              "file")
    skips = len({k.split(".")[1] for k in bare if k.startswith("zero_convs.")})
    first = bare.get("input_blocks.0.0.weight", (0,))[0]
    layout = residual_layout(unet_cfg)
    if (skips, first) != (len(layout) - 1, layout[0][0]):
        raise ConversionError(f"--controlnet: it is made for another base model: {skips} "
                              f"skips of {first} channels at its first level, this "
                              f"checkpoint's UNet has {len(layout) - 1} of {layout[0][0]}; "
                              "give a ControlNet trained for this base")
    hint = sorted((int(k.split(".")[1]), v) for k, v in bare.items()
                  if k.startswith("input_hint_block.") and k.endswith(".weight"))
    convs = [shape for _, shape in hint]  # conv_in, then (same, stride-2) pairs, conv_out
    channels = [convs[0][0]] + [s[0] for s in convs[2:-1:2]]
    from diffusers import ControlNetModel
    import inspect
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters) - {"self"}
    cfg = {k: v for k, v in unet_cfg.items() if k in accepted}
    cfg.update(in_channels=latent_channels, conditioning_channels=int(convs[0][1]),
               conditioning_embedding_out_channels=channels, _class_name="ControlNetModel")
    cross = bare.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if cross is not None and cross[1] != _norm(unet_cfg.get("cross_attention_dim")):
        cfg["cross_attention_dim"] = int(cross[1])  # what the file says, checked after
    return cfg


def load_controlnet(src: ControlNetSource) -> Any:
    """The ControlNetModel, fp32, eval mode."""
    import os

    import torch
    from diffusers import ControlNetModel
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not src.single_file:
        try:
            return ControlNetModel.from_pretrained(
                src.path, torch_dtype=torch.float32, local_files_only=True,
                use_safetensors=not src.allow_pickle).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ConversionError(f"--controlnet {src.path}: cannot be loaded ({exc})") from exc
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    state = read_tensors(src.path, "", src.allow_pickle)
    cfg = {k: v for k, v in src.config.items() if not k.startswith("_")}
    model = ControlNetModel.from_config(cfg)
    layers = cfg.get("layers_per_block", 2)
    try:
        converted = convert_controlnet_checkpoint(state, {**cfg, "layers_per_block": layers})
        missing, unexpected = model.load_state_dict(
            {k: v.float() for k, v in converted.items() if v is not None}, strict=False)
    except (KeyError, RuntimeError, ValueError) as exc:  # shapes the derived model lacks
        raise ConversionError(f"--controlnet {src.path}: its weights do not fit a ControlNet "
                              f"of this base's architecture ({str(exc)[:200]}); give a "
                              "diffusers ControlNetModel folder") from exc
    if missing or unexpected:
        raise ConversionError(f"--controlnet {src.path}: its weights do not fit the derived "
                              f"ControlNet (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}); give a diffusers ControlNetModel folder")
    return model.float().eval()


def _controlnet(m: Any, sample: Any, timestep: Any, context: Any, cond: Any) -> Any:
    down, mid = m(sample, timestep, context, controlnet_cond=cond, conditioning_scale=1.0,
                  guess_mode=False, return_dict=False)
    return (*down, mid)


def _controlnet_outputs(model: Any) -> tuple[str, ...]:
    return tuple(out for out, _ in C.residual_pairs(len(residual_layout(model.config)) - 1))


def _controlnet_example(model: Any, batch: int, size: Any, s: Shapes) -> dict[str, Any]:
    import torch
    out = _unet_example(model, batch, size, s)
    h, w = out[UnetIO.SAMPLE].shape[2:]
    out[ControlNetIO.COND] = torch.rand(batch, 3, h * s.vae_factor, w * s.vae_factor)
    return out


def controlnet_exporter(src: ControlNetSource) -> Exporter:
    return Exporter(C.CONTROLNET, lambda _ckpt: load_controlnet(src), _module(_controlnet),
                    _controlnet_example, optional_outputs=_controlnet_outputs)


def residual_inputs(unet_cfg: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(name for _, name in C.residual_pairs(len(residual_layout(unet_cfg)) - 1))


def controlled_unet_exporter(exp: Exporter) -> Exporter:
    """`exp` (the UNet's exporter, with or without feature caching's output) taking the
    ControlNet residuals as inputs too, handed to the UNet's forward by a pre-hook."""
    def wrap(model: Any) -> Any:
        import torch
        inner, k = exp.wrap(model), 3 + len(exp.optional(model))

        class ControlledUnet(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model  # the plain UNet's parameter names
                object.__setattr__(self, "_inner", inner)  # not registered twice

            def forward(self, *inputs: Any) -> Any:
                res = tuple(inputs[k:])

                def inject(_mod: Any, args: Any, kwargs: Any) -> Any:
                    return args, {**kwargs, "down_block_additional_residuals": res[:-1],
                                  "mid_block_additional_residual": res[-1]}
                # for this call only: a hook left on the UNet would keep this wrapper, and
                # through it the UNet, alive after the export (a cycle)
                handle = self.m.register_forward_pre_hook(inject, with_kwargs=True)
                try:
                    return self._inner(*inputs[:k])
                finally:
                    handle.remove()
        return ControlledUnet().eval()

    def example(model: Any, batch: int, size: Any, s: Shapes) -> dict[str, Any]:
        import torch
        out = exp.example(model, batch, size, s)
        h, w = out[UnetIO.SAMPLE].shape[2:]
        for name, (c, d) in zip(residual_inputs(model.config), residual_layout(model.config)):
            out[name] = torch.randn(batch, c, -(-h // d), -(-w // d))
        return out

    return replace(exp, wrap=wrap, example=example,
                   optional=lambda model: exp.optional(model) + residual_inputs(model.config))
