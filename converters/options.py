"""What a conversion is asked to do: one object, checked before any work starts."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from edge_sdk import names as N
from edge_sdk.errors import ConversionError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product / the exporter's attention patterns need 14+
INT8_METHODS = ("dynamic", "static")

# A bare precision sets these components. The VAE is the sensitive part (its output is the
# image) and stays fp32 unless named (`--precision int8,vae=int8`); the text encoder is small
# and loses most to 4 bits, so a bare "int4" makes it int8.
_BARE: dict[str, dict[str, str]] = {
    "int8": {N.TEXT_ENCODER: "int8", N.TEXT_ENCODER_2: "int8", N.UNET: "int8"},
    "int4": {N.TEXT_ENCODER: "int8", N.TEXT_ENCODER_2: "int8", N.UNET: "int4"},
    # static QDQ is for the NPU, which runs the UNet; the rest runs on the CPU beside it
    "w8a8": {N.UNET: "w8a8"},
    "w8a16": {N.UNET: "w8a16"},
    N.FULL_INT: {N.UNET: N.FULL_INT},
}


@dataclass(frozen=True)
class ConvertOptions:
    """Every option of `edge-convert` (see converters.cli for the flags)."""

    fmt: str = "onnx"  # "onnx" | "tflite"
    precision: str = "fp32"  # see parse_precision
    overwrite: bool = False
    allow_pickle: bool = False
    opset: int = DEFAULT_OPSET
    default_steps: int | None = None
    default_guidance: float | None = None
    vae_encoder: bool = True
    int8_method: str = "dynamic"  # "dynamic" | "static" (QDQ, calibrated)
    # prompts file for static quantization (w8a8, w8a16, int8 static; TFLite's int8-full)
    calibration: str | Path | None = None
    # static QDQ: leave the most sensitive layers float until the UNet's output PSNR against
    # fp32 reaches this (dB) on calibration inputs (converters.sensitivity)
    target_psnr: float | None = None
    # also export the decoder as stages for exact tiled decoding, which the low-memory modes
    # need at 512 px and above; None: yes for ONNX, no for TFLite (a pure TFLite bundle)
    vae_stages: bool | None = None
    attention_chunks: int | str = "auto"
    # TFLite: "512x512,512x768"; ONNX static QDQ: one size, the UNet's shapes fixed for NPUs
    sizes: str | None = None
    name: str | None = None  # the model's name in the manifest
    # TFLite: a folder of fp32 exports reused across conversions (converters.export_cache)
    export_cache: str | Path | None = None
    # a diffusers AutoencoderTiny folder (TAESD): its decoder added as vae_decoder_tiny
    tiny_vae: str | Path | None = None
    # a trained preview decoder (.safetensors, converters.preview_fit.read_preview_decoder):
    # it draws the live previews instead of the fitted linear map
    preview_decoder: str | Path | None = None
    # export the UNet's shallow branch and its deep-features output for feature caching
    # (converters.feature_cache); None: yes for ONNX where the UNet can be split (not with
    # static int8), no for TFLite
    feature_cache: bool | None = None
    # LoRAs fused into the UNet and text encoder before export: (file, scale) each
    loras: tuple[tuple[str | Path, float], ...] = ()
    # textual-inversion embedding files added to the tokenizer and text encoder
    embeddings: tuple[str | Path, ...] = ()
    # single-file checkpoints (converters.single_file): the family and prediction type when
    # detection is not wanted or cannot tell, or a diffusers-format folder of configs
    family: str | None = None
    prediction_type: str | None = None
    config: str | Path | None = None
    # a separately published VAE replacing the checkpoint's (single file or folder)
    vae: str | Path | None = None
    # ControlNets (diffusers ControlNetModel folders or original-layout single files),
    # exported as controlnet_0, controlnet_1 ... in this order (converters.controlnet)
    controlnets: tuple[str | Path, ...] = ()

    @classmethod
    def of(cls, options: "ConvertOptions | None", overrides: Mapping[str, Any]
           ) -> "ConvertOptions":
        """`options` (or the defaults) with keyword overrides; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown conversion option(s) {unknown}; known: {sorted(known)}")
        return replace(options or cls(), **overrides)

    @property
    def precisions(self) -> dict[str, str]:
        return parse_precision(self.precision)

    @property
    def with_vae_stages(self) -> bool:
        return self.fmt == "onnx" if self.vae_stages is None else self.vae_stages

    @property
    def wants_feature_cache(self) -> bool:
        """Feature caching asked for or left to the default (which may still skip a UNet
        that cannot be split)."""
        if self.feature_cache is None:
            return self.fmt == "onnx" and self.static_qdq is None
        return self.feature_cache

    @property
    def static_qdq(self) -> str | None:
        """The UNet's calibrated QDQ scheme: "w8a8" or "w8a16" (int8 with the static method
        is w8a8 with dynamic shapes), or None."""
        unet = self.precisions[N.UNET]
        if unet in N.QDQ_PRECISIONS:
            return unet
        return "w8a8" if self.int8_method == "static" and unet == "int8" else None

    @property
    def full_int(self) -> bool:
        """Whether the UNet is TFLite's full integer (calibrated like the QDQ schemes)."""
        return self.fmt == "tflite" and self.precisions[N.UNET] == N.FULL_INT

    def validate(self) -> "ConvertOptions":
        """Every option checked now, before a checkpoint is read; returns the options with
        `name` stripped (a shell's stray spaces are no name)."""
        if self.fmt not in N.BACKEND_FORMATS:
            raise ConversionError(f"format {self.fmt!r} is not supported; use one of "
                                  f"{list(N.BACKEND_FORMATS)}")
        if self.int8_method not in INT8_METHODS:
            raise ConversionError(f"int8 method {self.int8_method!r} unknown; use dynamic or "
                                  "static")
        if self.fmt == "tflite" and self.int8_method == "static":
            raise ConversionError("--int8-method static is ONNX's; TFLite's static int8 is "
                                  "--precision int8-full (drop --int8-method static)")
        _check_qdq(self)
        if self.fmt == "onnx" and self.export_cache is not None:
            raise ConversionError("--export-cache is for --format tflite (it keeps litert-torch's "
                                  "fp32 exports); drop it for ONNX")
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise ConversionError(f"--opset {self.opset} is too old; use {MIN_OPSET} or newer "
                                  f"(default {DEFAULT_OPSET})")
        _check_defaults(self.default_steps, self.default_guidance)
        unet = self.precisions[N.UNET]
        if self.int8_method == "static" and unet != "int8":
            raise ConversionError(f"--int8-method static quantizes an int8 UNet, but the UNet "
                                  f"is {unet} here; add --precision int8 or drop the option")
        if self.target_psnr is not None and (
                self.static_qdq is None or isinstance(self.target_psnr, bool)
                or not isinstance(self.target_psnr, (int, float))
                or not math.isfinite(self.target_psnr) or self.target_psnr <= 0):
            raise ConversionError(f"--target-psnr {self.target_psnr!r}: a positive number of "
                                  "dB, for ONNX static quantization (--precision w8a8 or "
                                  "w8a16; TFLite's int8-full has no per-layer fallback)")
        if self.calibration is not None and self.static_qdq is None and not self.full_int:
            raise ConversionError("--calibration is for static quantization (--precision w8a8 "
                                  "or w8a16, or int8-full for TFLite); without it the file "
                                  "would be ignored")
        if self.feature_cache and self.fmt == "tflite":
            raise ConversionError("--feature-cache is ONNX-only (TFLite bundles run every "
                                  "step whole); drop it or convert with --format onnx")
        if self.feature_cache and self.static_qdq is not None:
            raise ConversionError("--feature-cache is not available with static quantization "
                                  "(its calibrated UNet graph has no deep-features output); "
                                  "use dynamic int8 or drop --feature-cache")
        if self.tiny_vae is not None:
            _check_tiny_vae(Path(self.tiny_vae), self.allow_pickle)
        if self.preview_decoder is not None:
            from .preview_fit import read_preview_decoder
            read_preview_decoder(self.preview_decoder)
        _check_loras(self.loras)
        _check_controlnets(self)
        _check_source(self)
        name = self.name.strip() if self.name is not None else None
        if name == "":
            raise ConversionError("--name must not be empty (leave it out to use the "
                                  "checkpoint folder's name)")
        return replace(self, name=name)


def tiny_vae_config(path: str | Path) -> dict[str, Any]:
    """The config.json of a --tiny-vae folder (a ConversionError when unreadable)."""
    import json
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"--tiny-vae {path}: no readable config.json ({exc}); give a "
                              "diffusers AutoencoderTiny folder (e.g. madebyollin/taesd)") \
            from exc
    return cfg if isinstance(cfg, dict) else {}


def _check_tiny_vae(path: Path, allow_pickle: bool) -> None:
    """--tiny-vae names a diffusers AutoencoderTiny folder: config.json, with a positive
    scaling_factor, and safetensors weights (pickled .bin only with --allow-pickle)."""
    cfg = tiny_vae_config(path)
    cls = cfg.get("_class_name")
    if cls != "AutoencoderTiny":
        raise ConversionError(f"--tiny-vae {path}: config.json's _class_name is {cls!r}, "
                              "not 'AutoencoderTiny' (a TAESD folder)")
    scaling = cfg.get("scaling_factor", 1.0)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) \
            or not math.isfinite(scaling) or scaling <= 0:
        raise ConversionError(f"--tiny-vae {path}: scaling_factor {scaling!r} is not a "
                              "positive number")
    weights = list(path.glob("*.safetensors")) + (list(path.glob("*.bin")) if allow_pickle
                                                  else [])
    if not weights:
        raise ConversionError(f"--tiny-vae {path}: no .safetensors weights there"
                              + ("" if allow_pickle else " (pickled .bin weights need "
                                 "--allow-pickle)"))


def _check_loras(loras: Any) -> None:
    """--lora: (file, scale) pairs, each file present and each scale a finite number."""
    for item in loras:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise ConversionError(f"loras: each is (file, scale), got {item!r}")
        path, scale = item
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale):
            raise ConversionError(f"--lora {path}: scale {scale!r} is not a finite number")
        if not Path(path).is_file():
            raise ConversionError(f"--lora {path}: no such file")


def _check_controlnets(opts: ConvertOptions) -> None:
    if not opts.controlnets:
        return
    if isinstance(opts.controlnets, (str, Path)):
        raise ConversionError("controlnets must be a list of paths, one per ControlNet")
    if opts.fmt == "tflite":
        raise ConversionError("--controlnet: ControlNet bundles are ONNX (convert with "
                              "--format onnx)")
    if opts.static_qdq is not None or opts.full_int:
        raise ConversionError("--controlnet is not available with static quantization "
                              "(its calibration does not run the ControlNets); use int8 or "
                              "int4 (dynamic)")
    if opts.feature_cache:
        log.info("--feature-cache with --controlnet: generations with a control image run "
                 "every step whole")
    missing = [str(p) for p in opts.controlnets if not Path(p).exists()]
    if missing:
        raise ConversionError(f"--controlnet {missing[0]} does not exist")


def _check_source(opts: ConvertOptions) -> None:
    """--family, --prediction-type, --config and --vae, before the checkpoint is read."""
    from .single_file import check_source_options
    check_source_options(opts.family, opts.prediction_type, opts.config)
    if opts.vae is not None and not Path(opts.vae).is_file():
        raise ConversionError(f"--vae {opts.vae}: no such file")


def _check_qdq(opts: ConvertOptions) -> None:
    """w8a8 / w8a16 name the UNet of an ONNX bundle, int8-full that of a TFLite one; ONNX
    takes --sizes (one) only with w8a8 / w8a16."""
    prec = opts.precisions
    static = N.QDQ_PRECISIONS + (N.FULL_INT,)
    wrong = [c for c in N.COMPONENTS if c not in (N.UNET, N.UNET_SHALLOW)
             and prec[c] in static]
    if wrong:
        raise ConversionError(f"{prec[wrong[0]]} is a static quantization of the UNet (what "
                              f"an NPU runs); {wrong[0]} cannot take it: use fp32, fp16 or "
                              "int8 there")
    if opts.fmt == "tflite" and prec[N.UNET] in N.QDQ_PRECISIONS:
        raise ConversionError(f"{prec[N.UNET]} is ONNX's static QDQ; for TFLite use "
                              "--precision int8-full (static, full integer) or int8 "
                              "(dynamic), or convert with --format onnx")
    if opts.fmt == "onnx" and prec[N.UNET] == N.FULL_INT:
        raise ConversionError("int8-full is TFLite's full-integer UNet; add --format tflite, "
                              "or for ONNX use --precision w8a8 (static QDQ)")
    if opts.fmt != "onnx" or not opts.sizes:
        return
    if prec[N.UNET] not in N.QDQ_PRECISIONS:
        raise ConversionError("--sizes fixes the shapes of an NPU's UNet (--precision w8a8 or "
                              "w8a16) or of TFLite graphs; other ONNX graphs take any size")
    from .export_tflite import parse_sizes
    if len(parse_sizes(opts.sizes, 0, 8)) != 1:  # the syntax now, the multiple at export
        raise ConversionError(f"--sizes {opts.sizes}: an ONNX NPU bundle has one size (its "
                              "UNet is compiled for it); convert one bundle per size")


def _check_defaults(steps: int | None, guidance: float | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ConversionError(f"--default-steps must be a whole number >= 1, got {steps!r}")
    if guidance is not None and (isinstance(guidance, bool)
                                 or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or guidance < 0):
        raise ConversionError(f"--default-guidance must be a finite number >= 0, got "
                              f"{guidance!r}")


def parse_precision(spec: str) -> dict[str, str]:
    """`fp16` -> every component fp16; `int8` -> text encoder and UNet int8, VAE fp32;
    `int4` -> UNet int4, text encoder int8, VAE fp32; `unet=int4,vae=fp16` -> per component
    (`vae` means the VAE's decoder, encoder and tiny decoder). Unnamed: fp32. The UNet's
    shallow branch (feature caching) always takes the UNet's precision; the ControlNets
    take it too unless `controlnet=...` names theirs."""
    out = {c: "fp32" for c in N.COMPONENTS}
    controlnet = None
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, value = part.rpartition("=")
        if value not in N.PRECISIONS:
            raise ConversionError(f"precision {value!r} is not supported; choose one of "
                                  f"{list(N.PRECISIONS)}")
        if not name:
            out.update(_BARE.get(value, {c: value for c in N.COMPONENTS}))
            continue
        if name == N.CONTROLNET:
            if value in N.QDQ_PRECISIONS + (N.FULL_INT,):
                raise ConversionError(f"controlnet={value}: static quantization is the "
                                      "UNet's; a ControlNet is fp32, fp16, int8 or int4")
            controlnet = value
            continue
        targets = [N.VAE_DECODER, N.VAE_ENCODER, N.VAE_DECODER_TINY] if name == "vae" \
            else [name]
        for t in targets:
            if t not in out or t == N.UNET_SHALLOW:
                raise ConversionError(f"unknown component {t!r} in --precision; use "
                                      f"{[c for c in N.COMPONENTS if c != N.UNET_SHALLOW]} "
                                      "or 'vae' (the UNet's shallow branch takes the UNet's)")
            out[t] = value
    out[N.UNET_SHALLOW] = out[N.UNET]
    out[N.CONTROLNET] = controlnet or out[N.UNET]
    return out
