"""Single-file checkpoints (`edge-convert model.safetensors -o B`) in the original Stable
Diffusion layout: SD 1.x, SD 2.x (epsilon and v-prediction) and their inpainting variants,
SDXL base and (with `--family sdxl-turbo`) Turbo.

The family is read from the file's tensor names and shapes (converters.single_file_layout);
its configs ship in `assets/families/` (no hub is reachable), with the variant's edits made
here; `--config DIR` (a diffusers-format folder) covers any other architecture. The chosen
configs and a tokenizer are written to a private folder, so that the checkpoint reads like a
diffusers folder to every later stage; only the weights come from the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConversionError, SafetensorsError
from edge_sdk.manifest import sha256_file
from edge_sdk.safetensors_file import read_metadata

from .checkpoint import SAFE_SUFFIX, Checkpoint, read_json
from .clip_vocab import EOS, write_clip_tokenizer_files
from .single_file_layout import (FAMILIES, INPAINT_CHANNELS, TEXT_OPEN_CLIP,
                                 FileLayout, check_family, read_layout)
from .single_file_weights import (LABELS, check_shapes, check_suffix, empty_model,
                                  header_shapes, load_component)

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
MODEL_CONFIGS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json"}
XL_CONFIG = "text_encoder_2"  # SDXL's second text encoder, beside MODEL_CONFIGS
# SDXL-Turbo's configs: SDXL's with a 512 px native size and Euler ancestral, trailing
_TURBO = {"unet": {"sample_size": 64}, "vae": {"sample_size": 512},
          "scheduler": {"_class_name": "EulerAncestralDiscreteScheduler",
                        "timestep_spacing": "trailing"}}
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# SD 2.x v-prediction models are made for 768 px (latent 96), epsilon ones for 512 (64)
_SD2_SAMPLE_SIZE = {"v_prediction": 96, "epsilon": 64}
_OPEN_CLIP_PAD = "!"  # SD 2.x's tokenizer pads with "!", SD 1.x's with the end token
_EMA_KEYS = 100  # a file with more model_ema.* tensors than this holds EMA weights (diffusers)
# what the file may state: model-spec metadata values and original-config parameterizations
_STATED = {"v": "v_prediction", "v_prediction": "v_prediction", "eps": "epsilon",
           "epsilon": "epsilon"}


@dataclass
class SingleFileCheckpoint(Checkpoint):
    """A single file read through a folder of the configs chosen for it (`path`)."""

    file: Path = Path()
    layout: FileLayout | None = None
    family: str | None = None  # None: the configs came from --config
    prediction_type: str = "epsilon"
    # keeps the config folder alive as long as any copy of this checkpoint
    folder: Any = None

    def _check_weights(self, name: str) -> None:  # the weights are in the file
        return None

    def _read_model(self, cls: Any, name: str) -> Any:
        if name == "vae" and self.vae_file is not None:
            return super()._read_model(cls, name)
        assert self.layout is not None
        return load_component(name, self.config(name), self.file, self.layout.text,
                              self.allow_pickle)

    def parameter_shapes(self, name: str) -> dict[str, tuple[int, ...]] | None:
        """{parameter name: shape} of a component as the configs build it."""
        from edge_sdk.lora import param_key
        model = empty_model(name, self.config(name))
        return {param_key(k): tuple(v.shape) for k, v in model.state_dict().items()}

    def fingerprint(self) -> str:
        """sha256 over the file and the folder's fingerprint (the configs and tokenizer
        chosen for it, a --vae file)."""
        return hashlib.sha256((sha256_file(self.file) + super().fingerprint()).encode()
                              ).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the manifest records of the file and of how it was read."""
        assert self.layout is not None
        return {**super().describe(), "format": "single-file", "file": self.file.name,
                "family": self.family or "--config", "prediction_type": self.prediction_type,
                "text_encoder": self.layout.text}


def check_source_options(family: str | None, prediction_type: str | None,
                         config: str | Path | None) -> None:
    """--family, --prediction-type and --config by themselves, before any file is read."""
    if family is not None:
        check_family(family)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConversionError(f"--prediction-type {prediction_type!r} unknown; choose one of "
                              f"{list(PREDICTION_TYPES)}")
    if family is not None and config is not None:
        raise ConversionError("--family and --config both say which architecture the file "
                              "holds; give one of them")


def open_single_file(path: Path, allow_pickle: bool = False, family: str | None = None,
                     prediction_type: str | None = None, config: str | Path | None = None,
                     vae: str | Path | None = None) -> SingleFileCheckpoint:
    """Read the file's layout, choose its configs and write them to a private folder."""
    check_source_options(family, prediction_type, config)
    check_suffix(path, allow_pickle, "checkpoint")
    shapes = header_shapes(path, allow_pickle)
    layout = read_layout(shapes, str(path))
    if not layout.has_vae and vae is None:
        raise ConversionError(f"{path}: no VAE in the file (first_stage_model.*); give the "
                              "model's VAE with --vae FILE")
    if config is not None:
        configs, tokenizer = _user_configs(Path(config)), Path(config) / "tokenizer"
        chosen = None
    else:
        chosen = family or _detected(layout, path)
        configs, tokenizer = _family_configs(chosen), None
        if family and layout.family and family.removesuffix("-turbo") != layout.family:
            log.warning("%s: the weights look like %s; converting as %s (--family)", path,
                        layout.family, family)
    for name in ("unet", "text_encoder") + ((XL_CONFIG,) if XL_CONFIG in configs else ()) \
            + (("vae",) if vae is None else ()):
        check_shapes(name, shapes, configs[name], layout.text, f"{path} ({LABELS[name]})")
    predicted = _prediction_type(path, chosen, configs, prediction_type)
    apply_prediction_type(configs, chosen, predicted)
    if sum(k.startswith("model_ema.") for k in shapes) > _EMA_KEYS:
        log.info("%s: holds EMA weights too; converting the model's own (model.*), as "
                 "diffusers does by default", path.name)
    folder = tempfile.TemporaryDirectory(prefix="edge-convert-single-file-")
    root = Path(folder.name)
    _write_configs(root, configs)
    _write_tokenizers(root, tokenizer, layout, XL_CONFIG in configs)
    log.info("%s: %s, read as %s (%s)", path.name, layout.describe(), chosen or "--config",
             predicted)
    return SingleFileCheckpoint(root, configs["model_index"], allow_pickle,
                                vae_file=Path(vae) if vae is not None else None,
                                file=path, layout=layout, family=chosen,
                                prediction_type=predicted, folder=folder)


def _write_tokenizers(root: Path, given: Path | None, layout: FileLayout, xl: bool) -> None:
    """The --config folder's tokenizers, else CLIP's vocabulary with the family's pad
    tokens (SDXL: CLIP-L's and OpenCLIP's, one each)."""
    pads = {"tokenizer": _OPEN_CLIP_PAD if layout.text == TEXT_OPEN_CLIP else EOS}
    if xl:
        pads["tokenizer_2"] = _OPEN_CLIP_PAD
    for name, pad in pads.items():
        src = given.parent / name if given is not None else None
        if src is not None and src.is_dir():
            shutil.copytree(src, root / name)
        else:
            write_clip_tokenizer_files(root / name, pad)


def _detected(layout: FileLayout, path: Path) -> str:
    family = layout.family
    if family is None:
        raise ConversionError(
            f"{path}: an unknown architecture ({layout.describe()}); the known families are "
            "sd1 (CLIP text encoder, width 768) and sd2 (OpenCLIP, width 1024), with 4 "
            "input channels or 9 (inpainting), and sdxl (both, 2048). Give --config DIR, "
            "a diffusers-format folder "
            "with unet/, vae/ and text_encoder/ configs for this one")
    return family


def family_configs(family: str, prediction_type: str = "epsilon"
                   ) -> dict[str, dict[str, Any]]:
    """The configs a family's single files are read with (model_index included)."""
    configs = _family_configs(family)
    apply_prediction_type(configs, family, prediction_type)
    return configs


def _family_configs(family: str) -> dict[str, dict[str, Any]]:
    """The shipped base configs of a family, with its variant's edit (inpainting: the
    UNet's 9 input channels)."""
    base = resources.files("converters").joinpath(
        "assets/families", family.removesuffix("-inpainting").removesuffix("-turbo"))
    names = dict(MODEL_CONFIGS)
    if base.joinpath(XL_CONFIG, "config.json").is_file():
        names[XL_CONFIG] = "config.json"
    configs = {name: json.loads(base.joinpath(name, fname).read_text())
               for name, fname in names.items()}
    configs["scheduler"] = json.loads(base.joinpath(SCHEDULER_CONFIG).read_text())
    configs["model_index"] = {"_class_name": "StableDiffusionPipeline"}
    if XL_CONFIG in configs:
        configs["model_index"] = {"_class_name": "StableDiffusionXLPipeline",
                                  "force_zeros_for_empty_prompt": True}
    if family.endswith("-turbo"):
        for name, edits in _TURBO.items():
            configs[name].update(edits)
    if family.endswith("-inpainting"):
        configs["unet"]["in_channels"] = INPAINT_CHANNELS
        configs["model_index"]["_class_name"] = "StableDiffusionInpaintPipeline"
    return configs


def _user_configs(folder: Path) -> dict[str, dict[str, Any]]:
    """--config DIR: the three model configs required, scheduler and model index optional."""
    if not folder.is_dir():
        raise ConversionError(f"--config {folder}: not a folder; give a diffusers-format "
                              "folder with unet/, vae/ and text_encoder/ configs")
    missing = [f"{n}/{f}" for n, f in MODEL_CONFIGS.items() if not (folder / n / f).is_file()]
    if missing:
        raise ConversionError(f"--config {folder}: missing {missing}; it must hold the "
                              "unet/, vae/ and text_encoder/ config.json of the architecture")
    configs = {n: read_json(folder / n / f) for n, f in MODEL_CONFIGS.items()}
    if (folder / XL_CONFIG / "config.json").is_file():
        configs[XL_CONFIG] = read_json(folder / XL_CONFIG / "config.json")
    sched = folder / SCHEDULER_CONFIG
    family = _family_configs("sdxl" if XL_CONFIG in configs else "sd1")
    configs["scheduler"] = read_json(sched) if sched.is_file() else family["scheduler"]
    index = folder / "model_index.json"
    configs["model_index"] = read_json(index) if index.is_file() else family["model_index"]
    return configs


def _prediction_type(path: Path, family: str | None, configs: dict[str, dict[str, Any]],
                     given: str | None) -> str:
    """--prediction-type, else what the file's metadata or A1111's sidecar config says,
    else the family's (SD 2.x: ambiguous, refused) or the --config scheduler's."""
    if given is not None:  # (checked by check_source_options)
        return given
    stated = _stated_prediction_type(path)
    if stated is not None:
        return stated
    if family is None:
        return str(configs["scheduler"].get("prediction_type", "epsilon"))
    if family.startswith("sd2"):
        raise ConversionError(
            f"{path}: an SD 2.x checkpoint, whose prediction type the weights cannot tell: "
            "pass --prediction-type v_prediction (768-pixel models such as 2.0 and 2.1) or "
            "--prediction-type epsilon (512-pixel ones such as 2.x-base and 2.x "
            "inpainting)")
    return "epsilon"


def _stated_prediction_type(path: Path) -> str | None:
    """The prediction type a file states: Stability's model-spec metadata
    (`modelspec.prediction_type`), or the original config beside it, named as the file with
    `.yaml` (A1111's convention: `parameterization: "v"`; none means "eps")."""
    meta: dict[str, str] = {}
    if path.suffix == SAFE_SUFFIX:
        try:
            meta = read_metadata(path)
        except SafetensorsError:
            meta = {}
    spec = meta.get("modelspec.prediction_type")
    if spec is not None:
        if spec in _STATED:
            return _STATED[spec]
        log.warning("%s: modelspec.prediction_type %r is not one this reads (%s); ignored",
                    path.name, spec, sorted(_STATED))
    sidecar = path.with_suffix(".yaml")
    if not sidecar.is_file():
        return None
    found = re.search(r"^\s*parameterization:\s*['\"]?(\w+)",
                      sidecar.read_text(errors="replace"), re.MULTILINE)
    if found is None:  # the original configs' default: "eps"
        return "epsilon"
    if found.group(1) not in _STATED:
        raise ConversionError(f"{sidecar}: parameterization {found.group(1)!r} is not eps "
                              "or v; pass --prediction-type")
    return _STATED[found.group(1)]


def apply_prediction_type(configs: dict[str, dict[str, Any]], family: str | None,
                          prediction_type: str) -> None:
    """The prediction type, once known (it changes no weight's shape, so the shapes are
    checked before it is asked for); an SD 2.x family's native size follows it."""
    configs["scheduler"]["prediction_type"] = prediction_type
    if family is not None and family.startswith("sd2"):
        configs["unet"]["sample_size"] = _SD2_SAMPLE_SIZE[prediction_type]


def _write_configs(root: Path, configs: dict[str, dict[str, Any]]) -> None:
    extra = {XL_CONFIG: "config.json"} if XL_CONFIG in configs else {}
    for name, fname in {**MODEL_CONFIGS, **extra, "scheduler": "scheduler_config.json"}.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / fname).write_text(json.dumps(configs[name], indent=2))
    (root / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2))


__all__ = ["FAMILIES", "PREDICTION_TYPES", "SingleFileCheckpoint", "open_single_file"]
