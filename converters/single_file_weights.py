"""Loading the components of a single-file checkpoint, and a separately published VAE.

The tensors are renamed to diffusers' layout with diffusers' own conversion functions (the
ones behind `from_single_file`, which would otherwise fetch configs from the hub) and
assigned to a model built from the component's config without allocating it first. Every
weight the model needs must come from the file, and every weight renamed must find its
place: a mismatch is a ConversionError naming a few of the names, never a model left half
random.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from edge_sdk.errors import ConversionError, SafetensorsError
from edge_sdk.safetensors_file import read_header

from .checkpoint import PICKLE_SUFFIXES, SAFE_SUFFIX
from .single_file_layout import (CLIP_PREFIX, OPEN_CLIP_PREFIX, TEXT_OPEN_CLIP, TEXT_XL,
                                 UNET_PREFIX, VAE_PREFIX, XL_CLIP_PREFIX, XL_OPEN_CLIP_PREFIX)

# names a converted state may carry that the model has no place for, harmlessly: CLIP's
# position ids (a buffer) and OpenCLIP's projection and temperature (unused by SD)
_IGNORED_SUFFIXES = ("position_ids", "text_projection.weight", "logit_scale")
_SHOW = 4  # names quoted in an error


def header_shapes(path: Path, allow_pickle: bool) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape; only the header is read for .safetensors files."""
    if path.suffix == SAFE_SUFFIX:
        try:
            header, _ = read_header(path)
        except SafetensorsError as exc:
            raise ConversionError(str(exc)) from exc
        return {k: tuple(v["shape"]) for k, v in header.items()}
    return {k: tuple(v.shape) for k, v in read_tensors(path, "", allow_pickle).items()}


def check_suffix(path: Path, allow_pickle: bool, what: str) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ConversionError(f"{what} {path}: a pickle file ({path.suffix}), which can "
                                  "run code when loaded; edge-convert reads .safetensors "
                                  "only. Convert it to safetensors, or pass --allow-pickle "
                                  "if you trust the source")
    elif path.suffix != SAFE_SUFFIX:
        raise ConversionError(f"{what} {path}: not a checkpoint file; expected "
                              f"{SAFE_SUFFIX} (or {', '.join(PICKLE_SUFFIXES)} with "
                              "--allow-pickle)")


def read_tensors(path: Path, prefix: str, allow_pickle: bool) -> dict[str, Any]:
    """The torch tensors whose names start with `prefix` (prefix kept)."""
    if path.suffix != SAFE_SUFFIX:
        return {k: v for k, v in _pickled(path, allow_pickle).items() if k.startswith(prefix)}
    from .stream_load import read_tensors as read_plain, torch_dtypes
    try:
        header, start = read_header(path)
        names = [k for k in header if k.startswith(prefix)]
        if all(header[k]["dtype"] in torch_dtypes() for k in names):
            # read, not mapped: a mapping would stay resident beside the fp32 copies made
            # from these tensors (SDXL's UNet: 5 GB more at the conversion's peak)
            return dict(read_plain(path, header, start, names))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in names}
    except MemoryError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise ConversionError(f"{path}: cannot read its tensors ({exc}); the file is "
                              "damaged, download it again") from exc


def _pickled(path: Path, allow_pickle: bool) -> dict[str, Any]:
    check_suffix(path, allow_pickle, "checkpoint")
    return _unpickled(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=1)  # a .ckpt is read whole; once, not once per component
def _unpickled(name: str, _mtime: int) -> dict[str, Any]:
    import torch
    path = Path(name)
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConversionError(f"{path}: cannot load it ({exc})") from exc
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: holds {type(data).__name__}, not a state dict")
    return {k: v for k, v in data.items() if isinstance(k, str) and hasattr(v, "shape")}


_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder_2": XL_OPEN_CLIP_PREFIX}
LABELS = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder",
          "text_encoder_2": "second text encoder"}


def load_component(name: str, config: Mapping[str, Any], path: Path, text: str,
                   allow_pickle: bool) -> Any:
    """The diffusers/transformers model of component `name` with the file's weights (the
    converted state is consumed as the weights are put in place)."""
    model = empty_model(name, config)
    state = converted_state(name, read_tensors(path, _prefix(name, text), allow_pickle),
                            config, text, model)
    check_fit(model, state, f"{path} ({LABELS[name]})")
    return _assign(model, state)


def empty_model(name: str, config: Mapping[str, Any]) -> Any:
    """Component `name` built from its config without allocating its weights (a
    ConversionError when the config does not describe a model)."""
    from accelerate import init_empty_weights
    try:
        with init_empty_weights(include_buffers=False):
            if name == "unet":
                from diffusers import UNet2DConditionModel
                return UNet2DConditionModel.from_config(dict(config))
            if name == "vae":
                from diffusers import AutoencoderKL
                return AutoencoderKL.from_config(dict(config))
            from transformers import (CLIPTextConfig, CLIPTextModel,
                                      CLIPTextModelWithProjection)
            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            return cls(CLIPTextConfig.from_dict(dict(config)))
    except Exception as exc:  # diffusers/transformers validate configs in many ways
        raise ConversionError(f"the {LABELS[name]} config does not describe a model "
                              f"diffusers can build ({type(exc).__name__}: {exc}); fix the "
                              "config.json given with --config") from exc


def converted_state(name: str, state: Mapping[str, Any], config: Mapping[str, Any],
                    text: str, model: Any) -> dict[str, Any]:
    """Original-layout tensors renamed to the diffusers/transformers model's names."""
    from diffusers.loaders import single_file_utils as sfu
    state, cfg = dict(state), dict(config)
    if name == "unet":
        return sfu.convert_ldm_unet_checkpoint(state, cfg)
    if name == "vae":
        if any(".down_blocks." in k or ".up_blocks." in k for k in state):
            return _renamed_legacy_vae(state)  # already diffusers' layout (a --vae file)
        return sfu.convert_ldm_vae_checkpoint(state, cfg)
    if name == "text_encoder_2":  # SDXL's OpenCLIP bigG, with its text projection
        converted = sfu.convert_open_clip_checkpoint(model, state, prefix=XL_OPEN_CLIP_PREFIX)
    elif text == TEXT_OPEN_CLIP:
        converted = sfu.convert_open_clip_checkpoint(model, state, prefix=OPEN_CLIP_PREFIX)
    else:  # (its prefixes include SDXL's first encoder's)
        converted = sfu.convert_ldm_clip_checkpoint(state)
    # transformers >= 5 flattened CLIPTextModel (no `text_model.` level); old files lack it
    flat = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return flat if not hasattr(model, "text_model") else \
        {("" if k.startswith("text_projection") else "text_model.") + k: v
         for k, v in flat.items()}


# diffusers' VAE attention before it became `Attention` (files saved then keep these names)
_LEGACY_VAE = ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
               (".proj_attn.", ".to_out.0."))


def _renamed_legacy_vae(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if ".attentions." in k:
            for old, new in _LEGACY_VAE:
                k = k.replace(old, new)
        out[k] = v
    return out


def load_vae_file(path: Path, cfg: Mapping[str, Any], allow_pickle: bool) -> Any:
    """--vae FILE: a VAE published on its own replaces the checkpoint's."""
    check_suffix(path, allow_pickle, "--vae")
    model = empty_model("vae", cfg)
    converted = converted_state("vae", _vae_part(read_tensors(path, "", allow_pickle)), cfg,
                                "", model)
    check_fit(model, converted, f"--vae {path}")
    return _assign(model, converted)


def check_vae_file(path: Path, cfg: Mapping[str, Any], allow_pickle: bool) -> None:
    """--vae FILE fits the checkpoint's VAE config (from its header: nothing loaded)."""
    check_suffix(path, allow_pickle, "--vae")
    shapes = _vae_part(header_shapes(path, allow_pickle))
    check_shapes("vae", shapes, cfg, "", f"--vae {path}")


def _vae_part(state: Mapping[str, Any]) -> dict[str, Any]:
    """A VAE file's tensors; a whole checkpoint given as --vae: its VAE's."""
    if any(k.startswith(UNET_PREFIX) for k in state):
        return {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    return dict(state)


def check_shapes(name: str, shapes: Mapping[str, Any], config: Mapping[str, Any], text: str,
                 where: str) -> None:
    """The file's tensors of component `name` (names and shapes) fit the model the config
    builds: the conversion run on meta tensors, so a mismatch is found before any export."""
    import torch
    prefix = _prefix(name, text) if name != "vae" or any(
        k.startswith(VAE_PREFIX) for k in shapes) else ""
    state = {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()
             if k.startswith(prefix)}
    model = empty_model(name, config)
    converted = converted_state(name, state, config, text, model)
    check_fit(model, converted, where)
    if name == "unet":  # its conversion moves tensors, so what it left out is visible
        used = {id(v) for v in converted.values()}
        left = [k for k, v in state.items() if id(v) not in used]
        if left:
            raise ConversionError(
                f"{where}: {len(left)} of the file's UNet weights have no place in this "
                f"architecture, e.g. {left[:_SHOW]}: another architecture (give --config DIR "
                "with its configs) or a damaged file")


def _prefix(name: str, text: str) -> str:
    return _PREFIXES.get(name) or {TEXT_OPEN_CLIP: OPEN_CLIP_PREFIX,
                                   TEXT_XL: XL_CLIP_PREFIX}.get(text, CLIP_PREFIX)


def check_fit(model: Any, state: Mapping[str, Any], where: str) -> None:
    """Every weight of `model` in `state` with its shape, and nothing else of weight."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and not k.endswith(_IGNORED_SUFFIXES)]
    wrong = [f"{k} {tuple(state[k].shape)} (needs {tuple(v.shape)})"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or extra or wrong:
        raise ConversionError(
            f"{where}: the weights do not fit the architecture in the configs: "
            + "; ".join(f"{what} {len(names)}, e.g. {names[:_SHOW]}"
                        for what, names in (("missing", missing), ("unexpected", extra),
                                            ("wrong shape", wrong)) if names)
            + ". Another architecture? Give --family, or --config DIR with its configs")


def _assign(model: Any, state: dict[str, Any]) -> Any:
    """The weights (checked by check_fit) put in place one at a time, each cast to fp32 and
    taken out of `state` as it goes: a file's fp16 tensors and the fp32 model are not held
    whole together (SDXL's UNet: 5 GB + 10 GB)."""
    from accelerate.utils import set_module_tensor_to_device
    for name in list(model.state_dict()):
        t = state.pop(name).contiguous()
        set_module_tensor_to_device(model, name, "cpu",
                                    value=t.float() if t.is_floating_point() else t)
    return model.float().eval()
