"""The bundle manifest: what a converted model ships with, frozen.

The converter writes `manifest.json`; the runtime reads every model-specific number from it
(I/O names, dtypes, scheduler config, VAE scaling, tokenizer limits, checksums). Reading
validates the schema and reports the first problem with the path of the offending field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from . import names
from .errors import BundleError, IntegrityError, ManifestError

__all__ = [
    "TensorSpec",
    "FileEntry",
    "ComponentSpec",
    "TokenizerSpec",
    "VaeSpec",
    "UnetSpec",
    "Defaults",
    "SourceInfo",
    "Manifest",
    "sha256_file",
    "check_relative_name",
]

Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name and shape (str = dynamic axis)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class FileEntry:
    """A file of the bundle with the size and sha256 the converter wrote."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ComponentSpec:
    """One model component (text encoder, UNet, VAE decoder/encoder) as exported."""

    name: str
    format: str  # "onnx"
    path: str  # the graph file, relative to the bundle
    precision: str  # "fp32" | "fp16"
    files: tuple[FileEntry, ...]  # the graph and its external-data files
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, f"component {self.name!r} input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, f"component {self.name!r} output")


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    max_length: int  # 77 for CLIP
    pad_token: str  # "<|endoftext|>" (SD 1.x) or "!" (SD 2.x)
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int


@dataclass(frozen=True)
class VaeSpec:
    scaling_factor: float  # latents are divided by this before decoding (0.18215 for SD 1.x)
    shift_factor: float | None  # added after unscaling when the VAE has one
    latent_channels: int
    scale_factor: int  # image pixels per latent pixel (8)
    # the decoder's mid-block attention (global, at latent resolution, whatever the output
    # size) computed in this many query slices (1 = whole)
    attention_chunks: int = 1


@dataclass(frozen=True)
class UnetSpec:
    in_channels: int
    sample_size: int  # native latent size (64 -> 512 px for SD 1.5)
    cross_attention_dim: int
    # self-attention computed in this many query slices in the graph (1 = whole): the
    # attention score peak is the full tokens x tokens matrix divided by this
    attention_chunks: int = 1


@dataclass(frozen=True)
class Defaults:
    """What a generation uses when the caller leaves an argument as None."""

    steps: int
    guidance_scale: float
    width: int
    height: int


@dataclass(frozen=True)
class SourceInfo:
    name: str  # the checkpoint folder's name
    fingerprint: str  # sha256 over the checkpoint's configs and weight files
    pipeline_class: str
    diffusers_version: str | None


@dataclass(frozen=True)
class Manifest:
    family: str  # "stable-diffusion"
    variant: str  # "sd1" | "sd2"
    source: SourceInfo
    converter: Mapping[str, Any]
    components: Mapping[str, ComponentSpec]
    scheduler: Mapping[str, Any]  # diffusers scheduler_config.json, incl. "_class_name"
    prediction_type: str
    vae: VaeSpec
    unet: UnetSpec
    tokenizer: TokenizerSpec
    defaults: Defaults
    format_version: int = names.FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)

    # -- reading -------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: str | Path) -> "Manifest":
        """Read and validate `<bundle>/manifest.json`."""
        bundle = Path(bundle)
        if not bundle.exists():
            raise BundleError(f"bundle folder {str(bundle)!r} does not exist; pass the folder "
                              "written by `edge-convert CHECKPOINT -o BUNDLE`")
        if not bundle.is_dir():
            raise BundleError(f"{str(bundle)!r} is a file, not a bundle folder; pass the folder "
                              f"that holds {names.MANIFEST_FILE}")
        path = bundle / names.MANIFEST_FILE
        if not path.is_file():
            raise BundleError(f"{str(bundle)!r} has no {names.MANIFEST_FILE}: it is not an "
                              "edge-sdk bundle (convert a checkpoint with `edge-convert`)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(f"{path}: cannot be read as JSON ({exc}); re-convert the bundle"
                                ) from exc
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, where: str = names.MANIFEST_FILE) -> "Manifest":
        r = _Reader(where)
        d = r.obj(data, "")
        _refuse_nan(d, "", where)
        if r.get(d, "format", str) != names.BUNDLE_FORMAT:
            raise ManifestError(f"{where}: 'format' is not {names.BUNDLE_FORMAT!r}; "
                                "this is not an edge-sdk bundle manifest")
        version = r.get(d, "format_version", int)
        if version != names.FORMAT_VERSION:
            raise ManifestError(
                f"{where}: format_version {version} is not supported by this runtime (it reads "
                f"version {names.FORMAT_VERSION}); upgrade edge-sdk or re-convert the bundle")
        comps = r.get(d, "components", dict)
        components = {n: _component(r, n, c) for n, c in comps.items()}
        missing = [c for c in names.REQUIRED_COMPONENTS if c not in components]
        if missing:
            raise ManifestError(f"{where}: components {missing} are missing; a bundle needs "
                                f"{list(names.REQUIRED_COMPONENTS)}")
        sched = r.get(d, "scheduler", dict)
        r.get(sched, "_class_name", str, "scheduler.")
        v, u, t, df, s = (r.get(d, k, dict) for k in ("vae", "unet", "tokenizer", "defaults",
                                                       "source"))
        return cls(
            family=r.get(d, "family", str),
            variant=r.get(d, "variant", str),
            source=SourceInfo(r.get(s, "name", str, "source."),
                              r.get(s, "fingerprint", str, "source."),
                              r.get(s, "pipeline_class", str, "source."),
                              r.get(s, "diffusers_version", (str, type(None)), "source.")),
            converter=r.get(d, "converter", dict),
            components=components,
            scheduler=sched,
            prediction_type=r.choice(d, "prediction_type", ("epsilon", "v_prediction", "sample")),
            vae=VaeSpec(r.num(v, "scaling_factor", "vae."),
                        r.get(v, "shift_factor", (int, float, type(None)), "vae."),
                        r.pos(v, "latent_channels", "vae."), r.pos(v, "scale_factor", "vae."),
                        r.pos({"attention_chunks": 1, **v}, "attention_chunks", "vae.")),
            unet=UnetSpec(r.pos(u, "in_channels", "unet."), r.pos(u, "sample_size", "unet."),
                          r.pos(u, "cross_attention_dim", "unet."),
                          r.pos({"attention_chunks": 1, **u}, "attention_chunks", "unet.")),
            tokenizer=TokenizerSpec(
                check_relative_name(r.get(t, "file", str, "tokenizer."), where),
                r.pos(t, "max_length", "tokenizer."), r.get(t, "pad_token", str, "tokenizer."),
                *(r.get(t, k, int, "tokenizer.") for k in ("pad_token_id", "bos_token_id",
                                                           "eos_token_id"))),
            defaults=Defaults(r.pos(df, "steps", "defaults."),
                              r.num(df, "guidance_scale", "defaults."),
                              r.pos(df, "width", "defaults."), r.pos(df, "height", "defaults.")),
            format_version=version,
            extra=_extra(r, d),
        )

    # -- writing -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        out: dict[str, Any] = {"format": names.BUNDLE_FORMAT,
                               "format_version": d.pop("format_version")}
        out.update(d)
        return json.loads(json.dumps(out))  # tuples -> lists: exactly what the file holds

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    # -- integrity -----------------------------------------------------------------------
    def verify_files(self, bundle: str | Path, checksums: bool = True) -> None:
        """Check every component file exists with the recorded size (and sha256)."""
        bundle = Path(bundle)
        for comp in self.components.values():
            for entry in comp.files:
                path = bundle / entry.path
                if path.is_symlink():
                    raise BundleError(f"bundle file {entry.path!r} is a symbolic link; bundle "
                                      "files must be regular files inside the bundle folder "
                                      "(a link could point anywhere)")
                if not path.is_file():
                    raise BundleError(f"bundle file {entry.path!r} of component {comp.name!r} "
                                      f"is missing from {str(bundle)!r}; copy the whole bundle "
                                      "folder again or re-convert it")
                size = path.stat().st_size
                if size != entry.size:
                    raise IntegrityError(f"{path}: {size} bytes, the manifest says {entry.size} "
                                         "(truncated or replaced); copy the bundle again")
                if checksums and sha256_file(path) != entry.sha256:
                    raise IntegrityError(f"{path}: sha256 does not match the manifest (corrupted "
                                         "or modified); copy the bundle again, or load with "
                                         "verify=False to skip checksums")
        if not (bundle / self.tokenizer.file).is_file():
            raise BundleError(f"tokenizer file {self.tokenizer.file!r} is missing from "
                              f"{str(bundle)!r}; copy the whole bundle folder again")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_relative_name(name: str, where: str = names.MANIFEST_FILE) -> str:
    """Refuse file names that would leave the bundle folder (absolute, '..', separators)."""
    p = PurePosixPath(name)
    if (not name or p.is_absolute() or "\\" in name or ".." in p.parts or len(p.parts) != 1
            or name.startswith(".")):
        raise ManifestError(f"{where}: file name {name!r} is not a plain file name inside the "
                            "bundle; the manifest may only name files in the bundle folder")
    return name


def _find(specs: tuple[TensorSpec, ...], name: str, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise ManifestError(f"{what} {name!r} is not in the manifest (has "
                        f"{[s.name for s in specs]}); re-convert the bundle")


def _component(r: "_Reader", name: str, c: Any) -> ComponentSpec:
    pre = f"components.{name}."
    c = r.obj(c, pre)
    files = tuple(FileEntry(check_relative_name(r.get(f, "path", str, pre + "files[]."), r.where),
                            r.get(f, "size", int, pre + "files[]."),
                            r.get(f, "sha256", str, pre + "files[]."))
                  for f in (r.obj(x, pre + "files[]") for x in r.get(c, "files", list, pre)))
    path = check_relative_name(r.get(c, "path", str, pre), r.where)
    if path not in {f.path for f in files}:
        raise ManifestError(f"{r.where}: {pre}path {path!r} is not listed in {pre}files")

    def specs(key: str) -> tuple[TensorSpec, ...]:
        out = []
        for s in r.get(c, key, list, pre):
            s = r.obj(s, pre + key)
            shape = r.get(s, "shape", list, pre + key + ".")
            if not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in shape):
                raise ManifestError(f"{r.where}: {pre}{key}.shape must hold ints or axis names")
            out.append(TensorSpec(r.get(s, "name", str, pre + key + "."),
                                  r.get(s, "dtype", str, pre + key + "."), tuple(shape)))
        return tuple(out)

    return ComponentSpec(name=name, format=r.choice(c, "format", names.BACKEND_FORMATS, pre),
                         path=path, precision=r.get(c, "precision", str, pre), files=files,
                         inputs=specs("inputs"), outputs=specs("outputs"))


def _extra(r: _Reader, d: Mapping[str, Any]) -> dict[str, Any]:
    """`extra`, with the keys this runtime reads checked here, at load, rather than failing
    with a bare ValueError mid-generation (VAE stages are checked against the components by
    edge_sdk.vae.decoder_stages)."""
    extra = d.get("extra", {})
    if not isinstance(extra, dict):
        return {}
    if names.SIZE_MULTIPLE in extra:
        r.pos(extra, names.SIZE_MULTIPLE, "extra.")
    sizes = extra.get(names.TFLITE_SIZES)
    if sizes is not None and not (isinstance(sizes, list) and sizes and all(
            isinstance(hw, list) and len(hw) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)
            for hw in sizes)):
        raise ManifestError(f"{r.where}: field 'extra.{names.TFLITE_SIZES}' must be a list of "
                            f"[height, width] pairs, got {sizes!r}; re-convert the bundle")
    return extra


def _refuse_nan(value: Any, path: str, where: str) -> None:
    """NaN means nothing in a manifest (infinities do: diffusers writes -Infinity)."""
    if isinstance(value, float) and math.isnan(value):
        raise ManifestError(f"{where}: field '{path}' is NaN; re-convert the bundle")
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_nan(v, f"{path}.{k}" if path else str(k), where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_nan(v, f"{path}[{i}]", where)


class _Reader:
    """Typed field access that reports the manifest path of whatever is wrong."""

    def __init__(self, where: str) -> None:
        self.where = where

    def obj(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ManifestError(f"{self.where}: {path or 'the top level'} must be a JSON object")
        return value

    def get(self, d: Mapping[str, Any], key: str, typ: Any, prefix: str = "") -> Any:
        if key not in d:
            raise ManifestError(f"{self.where}: required field '{prefix}{key}' is missing; "
                                "re-convert the bundle with a matching edge-convert")
        value = d[key]
        bad_bool = isinstance(value, bool) and typ in (int, float, (int, float))
        if bad_bool or not isinstance(value, typ):
            raise ManifestError(f"{self.where}: field '{prefix}{key}' has the wrong type "
                                f"({type(value).__name__}: {value!r})")
        return value

    def num(self, d: Mapping[str, Any], key: str, prefix: str = "") -> float:
        value = float(self.get(d, key, (int, float), prefix))
        if not math.isfinite(value) or value < 0:
            raise ManifestError(f"{self.where}: field '{prefix}{key}' must be a finite number "
                                f">= 0, got {value}")
        return value

    def pos(self, d: Mapping[str, Any], key: str, prefix: str = "") -> int:
        value = self.get(d, key, int, prefix)
        if value <= 0:
            raise ManifestError(f"{self.where}: field '{prefix}{key}' must be > 0, got {value}")
        return value

    def choice(self, d: Mapping[str, Any], key: str, allowed: tuple[str, ...],
               prefix: str = "") -> str:
        value = self.get(d, key, str, prefix)
        if value not in allowed:
            raise ManifestError(f"{self.where}: field '{prefix}{key}' is {value!r}; this runtime "
                                f"accepts {list(allowed)}")
        return value
