"""Reading a diffusers-format Stable Diffusion checkpoint folder, one component at a time.

Only `.safetensors` weights are loaded unless the caller allows pickle files: a pickle
checkpoint (`.bin`, `.ckpt`, `.pt`) can run arbitrary code when loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConversionError
from edge_sdk.manifest import sha256_file

log = logging.getLogger(__name__)

COMPONENT_DIRS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
XL_DIRS = ("text_encoder_2", "tokenizer_2")  # SDXL's second text encoder and its tokenizer
# SDXL's micro-conditioning: original size, crop's top-left, target size (h, w each); the
# refiner's five (with an aesthetic score) are not supported
XL_TIME_IDS = 6
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
SAFE_SUFFIX = ".safetensors"


@dataclass
class Checkpoint:
    path: Path
    model_index: dict[str, Any]
    allow_pickle: bool = False
    # fused into the UNet and text encoder as they load (converters.lora_fuse)
    loras: tuple[Any, ...] = ()
    # textual inversions added to the tokenizer and text encoder (converters.embeddings)
    embeddings: tuple[Any, ...] = ()
    # --vae FILE: a separately published VAE that replaces the checkpoint's
    vae_file: Path | None = None
    # --controlnet: the ControlNets exported beside the UNet (converters.controlnet)
    controlnets: tuple[Any, ...] = ()

    @classmethod
    def open(cls, path: str | Path, allow_pickle: bool = False,
             vae: str | Path | None = None) -> "Checkpoint":
        """A diffusers-format folder (single files: converters.single_file)."""
        path = Path(path)
        if path.is_file():
            raise ConversionError(f"{path} is a single file; open it with "
                                  "converters.single_file.open_single_file")
        index = path / "model_index.json"
        if not index.is_file():
            raise ConversionError(f"{path} has no model_index.json: not a diffusers checkpoint "
                                  "folder")
        try:
            model_index = json.loads(index.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConversionError(f"{index}: unreadable ({exc})") from exc
        xl = (path / "text_encoder_2").is_dir() or "text_encoder_2" in model_index
        if model_index.get("requires_aesthetics_score") or (
                xl and model_index.get("text_encoder") in ([None, None], None)
                and not (path / "text_encoder").is_dir()):
            raise ConversionError(f"{path}: an SDXL refiner (one text encoder, aesthetic-score "
                                  "conditioning), which edge-convert does not convert; it "
                                  "takes SDXL base and Turbo checkpoints")
        missing = [d for d in COMPONENT_DIRS + (XL_DIRS if xl else ())
                   if not (path / d).is_dir()]
        if missing:
            raise ConversionError(f"{path}: missing component folder(s) {missing}; a Stable "
                                  f"Diffusion checkpoint needs {list(COMPONENT_DIRS)}")
        ckpt = cls(path, model_index, allow_pickle, vae_file=Path(vae) if vae else None)
        for name in ("unet", "vae", "text_encoder") + (XL_DIRS[:1] if xl else ()):
            ckpt._check_weights(name)
        return ckpt

    def _check_weights(self, name: str) -> None:
        files = [f for f in (self.path / name).iterdir() if f.is_file()]
        if any(f.name.endswith(SAFE_SUFFIX) for f in files):
            return
        pickles = [f.name for f in files if f.suffix in PICKLE_SUFFIXES]
        if pickles and not self.allow_pickle:
            raise ConversionError(
                f"{self.path / name} holds only pickle weights {pickles}; pickle files can run "
                "code when loaded, so edge-convert reads .safetensors only. Convert them to "
                "safetensors, or pass --allow-pickle if you trust the source")
        if not pickles:
            raise ConversionError(f"{self.path / name} has no weights (*.safetensors)")

    # -- configs -------------------------------------------------------------------------
    def config(self, name: str) -> dict[str, Any]:
        fname = "scheduler_config.json" if name == "scheduler" else "config.json"
        return read_json(self.path / name / fname)

    @cached_property
    def is_xl(self) -> bool:
        """SDXL: a second text encoder and a UNet taking added conditions."""
        return self.config("unet").get("addition_embed_type") == "text_time" \
            or (self.path / "text_encoder_2").is_dir()

    @property
    def pipeline_class(self) -> str:
        return str(self.model_index.get("_class_name", "StableDiffusionPipeline"))

    def fingerprint(self) -> str:
        """sha256 over every config and weight file (path, then content), sorted by path."""
        h = hashlib.sha256()
        for f in sorted(p for p in self.path.rglob("*") if p.is_file()):
            rel = f.relative_to(self.path).as_posix()
            if not (f.suffix in (".json", ".txt", SAFE_SUFFIX) or f.suffix in PICKLE_SUFFIXES):
                continue
            h.update(rel.encode() + b"\0")
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        if self.vae_file is not None:
            h.update(b"--vae\0" + sha256_file(self.vae_file).encode())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the manifest records of where the weights came from."""
        out: dict[str, Any] = {"format": "diffusers-folder"}
        if self.vae_file is not None:
            out["vae"] = {"file": self.vae_file.name, "sha256": sha256_file(self.vae_file)}
        return out

    def tokenizer_config(self) -> dict[str, Any]:
        p = self.path / "tokenizer" / "tokenizer_config.json"
        return read_json(p) if p.is_file() else {}

    # -- what this converter supports ----------------------------------------------------
    def check_supported(self) -> None:
        """Refuse, before any export, a checkpoint this converter would convert wrongly: a
        family it does not support yet, or components whose sizes disagree (each a
        ConversionError naming what was found)."""
        unet, vae, text = self.config("unet"), self.config("vae"), self.config("text_encoder")
        if self.is_xl:
            self._check_xl(unet, text)
        else:
            _same("the text encoder's width (text_encoder hidden_size)",
                  text.get("hidden_size"),
                  "the UNet's cross-attention width (unet cross_attention_dim)",
                  _first(unet.get("cross_attention_dim")))
        latent = vae.get("latent_channels")
        if not isinstance(latent, int) or isinstance(latent, bool) or latent < 1:
            raise ConversionError(f"{self.path / 'vae'}: latent_channels is {latent!r}, not a "
                                  "positive whole number")
        if self.is_xl and unet.get("in_channels") == 2 * latent + 1:
            raise ConversionError(f"{self.path}: an SDXL inpainting UNet "
                                  f"({unet.get('in_channels')} input channels); edge-convert "
                                  "converts SDXL text-to-image checkpoints (base, Turbo) so far")
        # an inpainting UNet takes latents + mask + masked-image latents
        if unet.get("in_channels") not in (latent, 2 * latent + 1):
            raise ConversionError(
                f"{self.path}: the UNet takes {unet.get('in_channels')!r} input channels; "
                f"with the VAE's {latent} latent channels it must take {latent} (text-to-"
                f"image) or {2 * latent + 1} (inpainting: latents + mask + masked-image "
                "latents); the components do not belong together")
        _same("the VAE's latent channels (vae latent_channels)", latent,
              "the UNet's out channels (unet out_channels)", unet.get("out_channels", 4))
        positions = text.get("max_position_embeddings", 77)
        length = self.tokenizer_config().get("model_max_length")
        if isinstance(length, int) and isinstance(positions, int) \
                and positions < length < 10**6:  # larger: "unset"
            raise ConversionError(f"{self.path}: the tokenizer's model_max_length ({length}) "
                                  f"exceeds the text encoder's max_position_embeddings "
                                  f"({positions}); the components do not belong together")

    def _check_xl(self, unet: dict[str, Any], text: dict[str, Any]) -> None:
        """SDXL's parts agree: both encoders' widths make the UNet's context, the second's
        projection and six time ids its added embedding's input (the refiner's aesthetic
        score and single encoder are refused)."""
        if unet.get("addition_embed_type") != "text_time" \
                or not (self.path / "text_encoder_2").is_dir():
            raise ConversionError(
                f"{self.path}: an SDXL-style checkpoint needs both a text_encoder_2 folder and "
                f"a UNet with addition_embed_type 'text_time' (found "
                f"{unet.get('addition_embed_type')!r}); the components do not belong together")
        text2 = self.config("text_encoder_2")
        _same("the text encoders' widths together (text_encoder + text_encoder_2 "
              "hidden_size)", int(text.get("hidden_size", 0)) + int(text2.get("hidden_size", 0)),
              "the UNet's cross-attention width (unet cross_attention_dim)",
              _first(unet.get("cross_attention_dim")))
        added = int(text2.get("projection_dim", 0)) \
            + XL_TIME_IDS * int(unet.get("addition_time_embed_dim") or 0)
        if unet.get("projection_class_embeddings_input_dim") != added:
            raise ConversionError(
                f"{self.path}: the UNet's added embedding takes "
                f"{unet.get('projection_class_embeddings_input_dim')!r} numbers, not the "
                f"second text encoder's projection plus {XL_TIME_IDS} time ids ({added}): an "
                "SDXL refiner (aesthetic-score conditioning) or mismatched components; "
                "edge-convert takes SDXL base and Turbo checkpoints")

    def parameter_shapes(self, name: str) -> dict[str, tuple[int, ...]] | None:
        """{parameter name: shape} of a component (None: only pickle weights to read)."""
        from .lora_fuse import parameter_shapes
        return parameter_shapes(self.path / name)

    # -- models --------------------------------------------------------------------------
    def _read_model(self, cls: Any, name: str) -> Any:
        """Component `name` as a torch module with the checkpoint's weights."""
        if name == "vae" and self.vae_file is not None:
            from .single_file_weights import load_vae_file
            return load_vae_file(self.vae_file, self.config("vae"), self.allow_pickle)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if name in ("unet", "vae"):  # the large ones: one tensor at a time, where exact
            from .stream_load import load_streamed
            model = load_streamed(cls, self.path / name)
            if model is not None:
                return model
        try:
            return cls.from_pretrained(self.path / name, local_files_only=True,
                                       use_safetensors=not self.allow_pickle)
        except Exception as exc:  # diffusers/transformers raise many kinds; report one
            raise ConversionError(f"cannot load {self.path / name}: {exc}") from exc

    def _load(self, cls: Any, name: str) -> Any:
        model = self._read_model(cls, name).float().eval()
        if self.loras:
            from .lora_fuse import LORA_COMPONENTS, fuse_loras
            roles = {folder: role for role, folder in LORA_COMPONENTS.items()}
            if name in roles:
                fuse_loras(model, roles[name], self.loras)
        return model

    def load_unet(self) -> Any:
        from diffusers import UNet2DConditionModel
        return self._load(UNet2DConditionModel, "unet")

    def load_vae(self) -> Any:
        from diffusers import AutoencoderKL
        return self._load(AutoencoderKL, "vae")

    def load_text_encoder(self) -> Any:
        from transformers import CLIPTextModel
        model = self._load(CLIPTextModel, "text_encoder")
        if self.embeddings:
            from .embeddings import add_tokens, add_vectors
            add_vectors(model, add_tokens(self._tokenizer(), self.embeddings), self.embeddings)
        return model

    def load_text_encoder_2(self) -> Any:
        """SDXL's second text encoder (with its text projection)."""
        from transformers import CLIPTextModelWithProjection
        return self._load(CLIPTextModelWithProjection, "text_encoder_2")

    def load_tokenizer(self, folder: str = "tokenizer") -> Any:
        """The tokenizer of `folder` (SDXL: "tokenizer_2" too), with the embeddings' tokens
        added."""
        if folder != "tokenizer":
            return self._tokenizer(folder)
        tok = self._tokenizer()
        if self.embeddings:
            from .embeddings import add_tokens
            add_tokens(tok, self.embeddings)
        return tok

    def _tokenizer(self, folder: str = "tokenizer") -> Any:
        from transformers import CLIPTokenizer
        try:
            return CLIPTokenizer.from_pretrained(self.path / folder, local_files_only=True)
        except Exception as exc:
            raise ConversionError(f"cannot load tokenizer from {self.path / folder}: {exc}"
                                  ) from exc


def open_checkpoint(path: str | Path, allow_pickle: bool = False, *,
                    family: str | None = None, prediction_type: str | None = None,
                    config: str | Path | None = None,
                    vae: str | Path | None = None) -> Checkpoint:
    """A diffusers folder or a single file; the single-file options refused for a folder,
    which states its own family and prediction type."""
    path = Path(path)
    if path.is_file():
        from .single_file import open_single_file
        ckpt: Checkpoint = open_single_file(path, allow_pickle, family, prediction_type,
                                            config, vae)
    else:
        ckpt = _open_folder(path, allow_pickle, family, prediction_type, config, vae)
    if vae is not None:
        from .single_file_weights import check_vae_file
        check_vae_file(Path(vae), ckpt.config("vae"), allow_pickle)
    return ckpt


def _open_folder(path: Path, allow_pickle: bool, family: str | None,
                 prediction_type: str | None, config: str | Path | None,
                 vae: str | Path | None) -> Checkpoint:
    given = [flag for flag, value in (("--family", family), ("--config", config),
                                      ("--prediction-type", prediction_type)) if value]
    if given and path.is_dir():
        raise ConversionError(f"{' and '.join(given)}: for single-file checkpoints; the "
                              f"diffusers folder {path} states its own configs (edit its "
                              "scheduler/scheduler_config.json to change the prediction type)")
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    return Checkpoint.open(path, allow_pickle, vae)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def _same(what: str, a: Any, other: str, b: Any) -> None:
    if a != b:
        raise ConversionError(f"{what} is {a} but {other} is {b}: the components do not "
                              "belong together (was one of them replaced?); fix the "
                              "checkpoint's configs or use matching weights")


def read_json(p: Path) -> dict[str, Any]:
    """A config file as a dict, or a ConversionError naming the file."""
    try:
        data = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{p}: unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise ConversionError(f"{p}: not a JSON object; the checkpoint's configs are broken")
    return data
