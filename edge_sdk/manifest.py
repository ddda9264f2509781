"""The bundle manifest: what a converted model ships with, frozen.

The converter writes `manifest.json`; the runtime reads every model-specific number from it
(I/O names, dtypes, scheduler config, VAE scaling, tokenizer limits, checksums). Reading
validates the schema (edge_sdk.manifest_reader) and reports the first problem with the path
of the offending field; a manifest of an older format version is migrated when read
(edge_sdk.manifest_v1).

Components are keyed by role (`text_encoder`, `unet`, `vae_decoder`, `vae_decoder_s03` ...)
and each records its kind, whose I/O contract is in edge_sdk.contracts: a bundle may hold
several components of one kind (two text encoders, a full and a tiny decoder, ControlNets).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

from . import names
from .errors import BundleError, IntegrityError, ManifestError

__all__ = ["TensorSpec", "FileEntry", "ComponentSpec", "TokenizerSpec", "DecoderStage",
           "VaeSpec", "UnetSpec", "TextSpec", "ControlNetSpec", "Defaults", "SourceInfo",
           "Manifest", "sha256_file", "check_relative_name"]

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
    """One exported network, under its role in the bundle."""

    name: str  # the role: the key in Manifest.components
    kind: str  # its I/O contract: edge_sdk.contracts.CONTRACTS
    format: str  # "onnx" | "tflite"
    path: str  # the graph file, relative to the bundle
    precision: str  # one of edge_sdk.names.PRECISIONS
    files: tuple[FileEntry, ...]  # the graph, its external data, its weight map
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # a JSON file of the bundle: checkpoint parameter name -> graph initializer name
    weight_map: str | None = None

    def input_names(self) -> set[str]:
        return {t.name for t in self.inputs}

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    max_length: int  # 77 for CLIP
    pad_token: str  # "<|endoftext|>" (SD 1.x) or "!" (SD 2.x)
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    size: int | None = None  # None only in bundles migrated from format 1
    sha256: str | None = None
    text_encoder: str = names.TEXT_ENCODER  # the role of the encoder it feeds


@dataclass(frozen=True)
class TextSpec:
    """How prompts become the UNet's text conditioning."""

    # the text encoders' roles: each reads the prompt with its own tokenizer, and their
    # hidden states are concatenated on the feature axis in this order (SDXL: CLIP ViT-L,
    # then OpenCLIP bigG)
    encoders: tuple[str, ...] = (names.TEXT_ENCODER,)
    # False: the last layer's output through the final LayerNorm (SD 1.x/2.x); True: the
    # penultimate layer's output as it is (SDXL; diffusers' hidden_states[-2])
    penultimate: bool = False
    # the encoder whose projected pooled output (text_embeds) the UNet takes; None: none
    pooled: str | None = None
    # diffusers' pipeline option: with no negative prompt, the unconditional embeddings are
    # zeros rather than the empty prompt's (SDXL base and Turbo set it)
    force_zeros_for_empty_prompt: bool = False


@dataclass(frozen=True)
class DecoderStage:
    """One stage of the VAE decoder or encoder for exact tiled running (see
    edge_sdk.tiling.Stage)."""

    component: str  # the stage's role in Manifest.components
    groups: int | None  # GroupNorm groups of its input; None: no GroupNorm
    halo: int
    scale: int  # 1, or 2 for an upsampling stage
    skips: tuple[int, ...]  # earlier stages whose outputs it also takes (-1: the input)
    tiled: bool  # False: run on the whole map (the mid-block attention)
    eps: float
    down: int = 1  # 1, or 2 for a downsampling stage (the encoder's stride-2 convolutions)


@dataclass(frozen=True)
class PreviewLayer:
    """One convolution of a bundle's preview decoder: `weight` flattened from `shape`
    (out, in, k, k), zero padding k // 2, stride 1; a ReLU follows every layer but the last."""

    shape: tuple[int, int, int, int]
    weight: tuple[float, ...]
    bias: tuple[float, ...]


def preview_chain_problem(shapes: list[tuple[int, ...]], latent_channels: int) -> str | None:
    """What is wrong with a preview decoder of these layer shapes (out, in, k, k) for latents
    of `latent_channels`, or None: it must take those channels, make RGB, chain, and use odd
    square kernels (so zero padding k // 2 keeps the size)."""
    if not shapes:
        return "it has no layers"
    for i, sh in enumerate(shapes):
        if len(sh) != 4 or any(not isinstance(d, int) or d < 1 for d in sh) \
                or sh[2] != sh[3] or sh[2] % 2 == 0:
            return f"layer {i} has shape {list(sh)}, not (out, in, k, k) with an odd k"
        want = latent_channels if i == 0 else shapes[i - 1][0]
        if sh[1] != want:
            return f"layer {i} takes {sh[1]} channels where {want} come in"
    if shapes[-1][0] != 3:
        return f"its last layer makes {shapes[-1][0]} channels, not 3 (RGB)"
    return None


@dataclass(frozen=True)
class VaeSpec:
    scaling_factor: float  # latents are divided by this before decoding (0.18215 for SD 1.x)
    shift_factor: float | None  # added after unscaling when the VAE has one
    latent_channels: int
    scale_factor: int  # image pixels per latent pixel (8)
    # the decoder's mid-block attention (global, at latent resolution, whatever the output
    # size) computed in this many query slices (1 = whole)
    attention_chunks: int = 1
    decoder_stages: tuple[DecoderStage, ...] = ()  # empty: the decoder only decodes whole
    decoder_channels: int = 0  # channels of its full-resolution blocks (0: not recorded)
    # the encoder's stages (image -> latent moments), for exact tiled encoding; empty: whole
    encoder_stages: tuple[DecoderStage, ...] = ()
    # the tiny decoder's own scaling (latents are divided by it; AutoencoderTiny's config,
    # 1.0 for TAESD); 0: the bundle has no tiny decoder
    tiny_scaling_factor: float = 0.0
    # live previews: [latent pixel, 1] @ latent_rgb -> RGB in [0, 1], (latent_channels + 1)
    # rows of 3, fitted at conversion (converters.preview_fit); empty: not fitted
    latent_rgb: tuple[tuple[float, ...], ...] = ()
    # live previews from a small convolutional net at latent resolution (latents in
    # diffusion space -> RGB in [0, 1]), trained for the model and given at conversion
    # (`edge-convert --preview-decoder`); where present it draws the "map" previews instead
    # of latent_rgb. Empty: none
    preview_decoder: tuple[PreviewLayer, ...] = ()


@dataclass(frozen=True)
class UnetSpec:
    in_channels: int
    sample_size: int  # native latent size (64 -> 512 px for SD 1.5)
    cross_attention_dim: int
    # self-attention computed in this many query slices in the graph (1 = whole): the
    # attention score peak is the full tokens x tokens matrix divided by this
    attention_chunks: int = 1
    size_multiple: int = 8  # image sides must be multiples of this many pixels
    # (downscale, heads) of each level with self-attention: tokens there are the latent
    # pixels / downscale^2 (empty: not recorded; the memory estimate then assumes the worst)
    attention_levels: tuple[tuple[int, int], ...] = ()
    base_channels: int = 0  # channels of its first level (0: not recorded)
    # LCM-distilled UNets: the width of the guidance-scale embedding they take as
    # `timestep_cond` (guidance is then embedded, not classifier-free); 0: none
    time_cond_proj_dim: int = 0
    # a ControlNet bundle's UNet takes a residual for each skip of its down path and one
    # for its middle block: (channels, downscale from the latents) of each, in that order;
    # empty: it takes none
    residuals: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class ControlNetSpec:
    """One ControlNet of the bundle: what it was converted from and what it takes."""

    component: str  # its role in Manifest.components (controlnet_0, ...)
    name: str  # the ControlNet's name (its folder's or file's)
    fingerprint: str  # sha256 over its config and weights
    conditioning_channels: int = 3  # of the control image (RGB)
    # diffusers' global_pool_conditions (e.g. the shuffle ControlNet): its residuals are
    # spatial means, and it always runs in guess mode
    global_pool: bool = False


@dataclass(frozen=True)
class Defaults:
    """What a generation uses when the caller leaves an argument as None."""

    steps: int
    guidance_scale: float
    width: int
    height: int


@dataclass(frozen=True)
class SourceInfo:
    name: str  # the model's name (edge-convert --name; default: the checkpoint folder's)
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
    tokenizers: Mapping[str, TokenizerSpec]
    scheduler: Mapping[str, Any]  # diffusers scheduler_config.json, incl. "_class_name"
    prediction_type: str
    vae: VaeSpec
    unet: UnetSpec
    defaults: Defaults
    # TFLite graphs have static shapes: the (height, width) pixel sizes they were exported
    # for; None: any size (a multiple of unet.size_multiple)
    static_sizes: tuple[tuple[int, int], ...] | None = None
    text: TextSpec = field(default_factory=TextSpec)
    controlnets: tuple[ControlNetSpec, ...] = ()  # in the order control images come
    format_version: int = names.FORMAT_VERSION
    # the format of the file this was read from, when older (migrated when read); not written
    migrated_from: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # informational; never read

    @property
    def tokenizer(self) -> TokenizerSpec:
        """The tokenizer of the (first) text encoder."""
        return self.tokenizers[names.TOKENIZER]

    def tokenizer_of(self, encoder: str) -> tuple[str, TokenizerSpec]:
        """The (role, spec) of the tokenizer that feeds text encoder `encoder`."""
        return next((role, t) for role, t in self.tokenizers.items()
                    if t.text_encoder == encoder)

    @property
    def main_roles(self) -> tuple[str, ...]:
        """The roles every generation runs: the required ones and each text encoder."""
        return names.REQUIRED_COMPONENTS + tuple(
            e for e in self.text.encoders if e not in names.REQUIRED_COMPONENTS)

    @property
    def added_conditions(self) -> bool:
        """The UNet takes SDXL's added conditions (pooled text embeddings and time ids)."""
        return self.text.pooled is not None

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
        from .manifest_reader import read_manifest
        return read_manifest(data, where)

    # -- writing -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("migrated_from")
        out: dict[str, Any] = {"format": names.BUNDLE_FORMAT,
                               "format_version": d.pop("format_version")}
        out.update(d)
        return json.loads(json.dumps(out))  # tuples -> lists: exactly what the file holds

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    # -- integrity -----------------------------------------------------------------------
    def verify_files(self, bundle: str | Path, checksums: bool = True) -> None:
        """Check every file the runtime reads exists with the recorded size (and sha256)."""
        bundle = Path(bundle)
        for comp in self.components.values():
            for entry in comp.files:
                _check_file(bundle, entry, f"of component {comp.name!r}", checksums)
        for role, tok in self.tokenizers.items():
            if tok.size is None or tok.sha256 is None:  # migrated: presence only
                if not (bundle / tok.file).is_file():
                    raise BundleError(f"tokenizer file {tok.file!r} is missing from "
                                      f"{str(bundle)!r}; copy the whole bundle folder again")
                continue
            _check_file(bundle, FileEntry(tok.file, tok.size, tok.sha256), f"of {role!r}",
                        checksums)


def _check_file(bundle: Path, entry: FileEntry, owner: str, checksums: bool) -> None:
    path = bundle / entry.path
    if path.is_symlink():
        raise BundleError(f"bundle file {entry.path!r} is a symbolic link; bundle files must "
                          "be regular files inside the bundle folder (a link could point "
                          "anywhere)")
    if not path.is_file():
        raise BundleError(f"bundle file {entry.path!r} {owner} is missing from "
                          f"{str(bundle)!r}; copy the whole bundle folder again or re-convert "
                          "it")
    size = path.stat().st_size
    if size != entry.size:
        raise IntegrityError(f"{path}: {size} bytes, the manifest says {entry.size} "
                             "(truncated or replaced); copy the bundle again")
    if checksums and sha256_file(path) != entry.sha256:
        raise IntegrityError(f"{path}: sha256 does not match the manifest (corrupted or "
                             "modified); copy the bundle again, or load with verify=False to "
                             "skip checksums")


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
