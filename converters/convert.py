"""`convert()`: a diffusers checkpoint folder -> an edge-sdk bundle folder.

The bundle's roles are exported one at a time, each by its kind's exporter
(converters.registry) in the asked format, and freed after export, so peak memory is that of
the largest component, not the whole pipeline. Static int8 is a step of its own: an fp32
bundle is converted aside, the runtime generates with it to record the UNet's inputs
(converters.calibrate), and the UNet is quantized from that bundle's graph.
"""

from __future__ import annotations

import errno
import functools
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from edge_sdk import names as N
from edge_sdk.contracts import contract_of
from edge_sdk.errors import ConversionError
from edge_sdk.manifest import ComponentSpec, DecoderStage, Manifest, PreviewLayer

from .attention import use_chunked_attention
from .bundle import AtomicBundle, file_entries, onnx_io, write_manifest
from .bundle_manifest import AUTOENCODER_KL_DEFAULT_SCALING, Layout, build_manifest
from .checkpoint import Checkpoint, open_checkpoint
from .export_onnx import export_onnx
from .options import ConvertOptions, parse_precision, tiny_vae_config
from .registry import exporter
from .tokenizer import export_tokenizer

log = logging.getLogger(__name__)

__all__ = ["convert", "ConvertOptions", "parse_precision"]

Progress = Callable[[str], None]
# (stage folder) -> the UNet's files, made some other way than by exporting it
UnetSource = Callable[[Path], list[str]]


def _storage_errors_reported(fn: Callable[..., Manifest]) -> Callable[..., Manifest]:
    """A full disk, a read-only or unwritable output, etc. become a ConversionError naming
    the cause and the path (AtomicBundle has already removed the partial bundle)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Manifest:
        try:
            return fn(*args, **kwargs)
        except OSError as exc:
            hint = {errno.ENOSPC: "free some disk space or write the bundle elsewhere",
                    errno.EDQUOT: "free some disk quota or write the bundle elsewhere",
                    errno.EACCES: "choose an output folder you can write to",
                    errno.EPERM: "choose an output folder you can write to",
                    errno.EROFS: "the filesystem is read-only; write the bundle elsewhere"}
            where = f" ({exc.filename})" if exc.filename else ""
            raise ConversionError(
                f"writing the bundle failed: {exc.strerror or exc}{where}; "
                f"{hint.get(exc.errno, 'check the output location')}. Nothing was left "
                "behind; an existing bundle there is unchanged") from exc
    return wrapper


@_storage_errors_reported
def convert(checkpoint: str | Path, output: str | Path, options: ConvertOptions | None = None,
            *, progress: Progress | None = None, **kwargs: Any) -> Manifest:
    """Convert `checkpoint` into a bundle at `output` and return its manifest.

    `options` (or keyword arguments naming its fields) say how: see ConvertOptions. Every
    option and the checkpoint's consistency are checked before anything is exported."""
    opts = ConvertOptions.of(options, kwargs).validate()
    say = progress or (lambda msg: log.info("%s", msg))
    if opts.export_cache is not None:
        from .export_cache import open_cache
        open_cache(opts.export_cache)
    ckpt = open_checkpoint(checkpoint, opts.allow_pickle, family=opts.family,
                           prediction_type=opts.prediction_type, config=opts.config,
                           vae=opts.vae)
    ckpt.check_supported()
    if ckpt.is_xl:
        from .sdxl import check_xl_options
        opts = check_xl_options(opts)
    if opts.fmt == "tflite":  # (after the checkpoint: an SDXL one is refused by name first)
        from .export_tflite import require_litert_torch
        require_litert_torch()
    if opts.loras:
        from .lora_fuse import read_loras
        ckpt = replace(ckpt, loras=tuple(read_loras(ckpt, opts.loras)))
    if opts.embeddings:
        from .embeddings import read_embeddings
        ckpt = replace(ckpt, embeddings=tuple(read_embeddings(
            opts.embeddings, int(ckpt.config("text_encoder").get("hidden_size", 0)),
            ckpt.load_tokenizer().get_vocab(), opts.allow_pickle)))
    if opts.controlnets:
        from .controlnet import read_controlnet
        ckpt = replace(ckpt, controlnets=tuple(read_controlnet(
            p, ckpt.config("unet"), int(ckpt.config("vae")["latent_channels"]),
            opts.allow_pickle) for p in opts.controlnets))
    if opts.tiny_vae is not None:
        _check_tiny_matches(ckpt, Path(opts.tiny_vae))
    preview_layers: tuple[PreviewLayer, ...] = ()
    if opts.preview_decoder is not None:  # its channels against this VAE's, before exports
        from .preview_fit import read_preview_decoder
        preview_layers = read_preview_decoder(opts.preview_decoder,
                                              ckpt.config("vae").get("latent_channels"))
    layout = Layout.of(ckpt, opts)
    source = Path(checkpoint).absolute()
    name = opts.name or (source.stem if source.is_file() else source.name)
    if opts.static_qdq is not None or opts.full_int:
        if opts.full_int:
            from .full_integer import convert_full_int as calibrated
        else:
            from .calibrate import convert_static as calibrated
        return calibrated(output, opts, say, lambda out, o, s, unet=None: write_bundle(
            ckpt, out, o, layout, name, s, unet, preview_layers))
    return write_bundle(ckpt, output, opts, layout, name, say, preview_layers=preview_layers)


def _check_tiny_matches(ckpt: Checkpoint, folder: Path) -> None:
    tiny = tiny_vae_config(folder)
    want = ckpt.config("vae").get("latent_channels")
    if tiny.get("latent_channels") != want:
        raise ConversionError(f"--tiny-vae {folder}: it decodes {tiny.get('latent_channels')} "
                              f"latent channels, this checkpoint's VAE makes {want}; give the "
                              "tiny VAE made for this model family")


def write_bundle(ckpt: Checkpoint, output: str | Path, opts: ConvertOptions, layout: Layout,
                 name: str, say: Progress, unet_source: UnetSource | None = None,
                 preview_layers: tuple[PreviewLayer, ...] = ()) -> Manifest:
    """Export every role of the bundle into a staging folder, then move it into place;
    `preview_layers`: the --preview-decoder's, read and checked by `convert`."""
    from .export_tflite import parse_sizes
    sizes = parse_sizes(opts.sizes, layout.native, layout.size_multiple) \
        if opts.fmt == "tflite" or opts.sizes else None  # ONNX: an NPU UNet's one size
    cache = _feature_cache(ckpt, opts) and unet_source is None
    opts = replace(opts, feature_cache=cache)
    plan = [N.TEXT_ENCODER] + ([N.TEXT_ENCODER_2] if ckpt.is_xl else []) + [N.UNET] \
        + ([N.UNET_SHALLOW] if cache else []) \
        + [N.controlnet_role(i) for i in range(len(ckpt.controlnets))] + [N.VAE_DECODER] \
        + ([N.VAE_ENCODER] if opts.vae_encoder else []) \
        + ([N.VAE_DECODER_TINY] if opts.tiny_vae is not None else [])
    components: dict[str, ComponentSpec] = {}
    with AtomicBundle(output, overwrite=opts.overwrite) as stage:
        for i, role in enumerate(plan, 1):
            t0 = time.perf_counter()
            precision = _precision(opts, role)
            say(f"[{i}/{len(plan)}] {role}: loading and exporting ({precision})")
            source = unet_source if role == N.UNET else None
            components[role] = _export_role(role, ckpt, stage, opts, layout, sizes, source)
            say(f"[{i}/{len(plan)}] {role}: done in {time.perf_counter() - t0:.1f} s, "
                f"{components[role].bytes / 1e6:.1f} MB")
        stages = _export_vae_stages(ckpt, stage, opts, layout, components, say) \
            if opts.with_vae_stages else ((), ())
        toks = {N.TOKENIZER: export_tokenizer(ckpt, stage, layout.shapes.text_len)}
        if ckpt.is_xl:
            toks[N.TOKENIZER_2] = export_tokenizer(ckpt, stage, layout.shapes.text_len,
                                                   N.TOKENIZER_2)
        say(f"tokenizer: {', '.join(t.file for t in toks.values())} written and checked")
        previews = _fit_previews(ckpt, layout), preview_layers
        say("previews: latent-to-RGB map fitted against the VAE"
            + (f"; preview decoder of {len(previews[1])} layers" if previews[1] else ""))
        manifest = build_manifest(ckpt, opts, layout, name, components, toks, stages,
                                  tuple(sizes) if sizes else None, *previews,
                                  extra=getattr(unet_source, "manifest_info", None))
        write_manifest(stage, manifest)
    say(f"bundle written to {Path(output)}")
    return manifest


def _export_role(role: str, ckpt: Checkpoint, stage: Path, opts: ConvertOptions,
                 layout: Layout, sizes: list[tuple[int, int]] | None,
                 source: UnetSource | None) -> ComponentSpec:
    """One role exported (or made by `source`) into `stage`, described for the manifest."""
    exp, precision = _exporter(role, opts, ckpt), _precision(opts, role)
    if source is not None:
        files = source(stage)
    elif opts.fmt == "tflite" and sizes is not None:
        from .export_tflite import export_tflite
        model = _load(role, ckpt, layout, opts)
        cache = None
        if opts.export_cache is not None:  # sizes: for the components traced per size
            from .export_cache import export_key
            cache = (Path(opts.export_cache),
                     export_key(role, model, sizes if exp.sized else None, layout))
        files = export_tflite(role, exp, model, stage, precision, sizes, layout.shapes, cache)
    else:
        files = export_onnx(role, exp, lambda: _load(role, ckpt, layout, opts), stage,
                            precision, layout.shapes, opts.opset)
    if files[0].endswith(".tflite"):
        from .export_tflite import tflite_io
        return ComponentSpec(role, exp.contract.kind, "tflite", files[0], precision,
                             file_entries(stage, files), *tflite_io(stage / files[0],
                                                                    exp.contract))
    weight_map = next((f for f in files if f.endswith(N.WEIGHT_MAP_SUFFIX)), None)
    return ComponentSpec(role, exp.contract.kind, "onnx", files[0], precision,
                         file_entries(stage, files), *onnx_io(stage / files[0]), weight_map)


def _fit_previews(ckpt: Checkpoint, layout: Layout) -> tuple[tuple[float, ...], ...]:
    """The live previews' latent-to-RGB map, fitted against this VAE (preview_fit)."""
    from .preview_fit import fit_latent_rgb
    cfg = ckpt.config("vae")
    return fit_latent_rgb(ckpt.load_vae(), float(cfg.get("scaling_factor",
                                                         AUTOENCODER_KL_DEFAULT_SCALING)),
                          cfg.get("shift_factor"), layout.shapes.vae_factor)


def _feature_cache(ckpt: Checkpoint, opts: ConvertOptions) -> bool:
    """Whether this conversion exports the feature-caching graphs: asked for (an error if
    the UNet cannot be split), or by default where it can."""
    from .feature_cache import cache_problem
    if not opts.wants_feature_cache:
        return False
    problem = cache_problem(ckpt.config("unet"))
    if problem is None:
        return True
    if opts.feature_cache:
        raise ConversionError(f"--feature-cache: this UNet cannot be split ({problem}); "
                              "drop the option")
    log.info("no feature-caching graphs: this UNet cannot be split (%s)", problem)
    return False


def _precision(opts: ConvertOptions, role: str) -> str:
    """A role's precision (every ControlNet's is --precision's `controlnet`)."""
    return opts.precisions[N.CONTROLNET if role.startswith(N.CONTROLNET) else role]


def _exporter(role: str, opts: ConvertOptions, ckpt: Checkpoint) -> Any:
    """The role's exporter (the tiny decoder's loads from --tiny-vae; the UNet's adds its
    deep features where the bundle caches them, and takes the ControlNets' residuals where
    it has ControlNets; SDXL's text encoders read raw layers)."""
    if role.startswith(N.CONTROLNET):
        from .controlnet import controlnet_exporter
        return controlnet_exporter(ckpt.controlnets[int(role.rsplit("_", 1)[1])])
    if role == N.UNET_SHALLOW or (role == N.UNET and opts.feature_cache):
        from .feature_cache import cached_unet_exporter, shallow_exporter
        exp = shallow_exporter() if role == N.UNET_SHALLOW else cached_unet_exporter()
    elif role == N.VAE_DECODER_TINY:
        from .registry import tiny_decoder_exporter
        return tiny_decoder_exporter(opts.tiny_vae, opts.allow_pickle)
    else:
        exp = exporter(role, ckpt.is_xl)
    if role == N.UNET and ckpt.controlnets:
        from .controlnet import controlled_unet_exporter
        return controlled_unet_exporter(exp)
    return exp


def _load(role: str, ckpt: Checkpoint, layout: Layout, opts: ConvertOptions) -> Any:
    """The role's torch module, with sliced attention where the layout says."""
    model = _exporter(role, opts, ckpt).load(ckpt)
    unet_like = role in (N.UNET, N.UNET_SHALLOW) or role.startswith(N.CONTROLNET)
    chunks = layout.unet_chunks if unet_like else layout.vae_chunks
    if role not in (N.TEXT_ENCODER, N.TEXT_ENCODER_2, N.VAE_DECODER_TINY) and chunks > 1:
        use_chunked_attention(model, chunks)
    return model


def _export_vae_stages(ckpt: Checkpoint, stage: Path, opts: ConvertOptions, layout: Layout,
                       components: dict[str, ComponentSpec], say: Progress
                       ) -> tuple[tuple[DecoderStage, ...], tuple[DecoderStage, ...]]:
    """The VAE decoder (and encoder, when the bundle has one) again, as GroupNorm-delimited
    stages for exact tiled decoding (encoding)."""
    from .vae_stages import export_decoder_stages
    out = []
    vae = None  # one AutoencoderKL serves both halves
    for half, role, kind, prefix in (
            ("decoder", N.VAE_DECODER, N.VAE_DECODER_STAGE, "vae_decoder_s"),
            ("encoder", N.VAE_ENCODER, N.VAE_ENCODER_STAGE, "vae_encoder_s")):
        if role not in components:
            out.append(())
            continue
        t0 = time.perf_counter()
        precision = opts.precisions[role]
        precision = precision if precision in ("fp32", "fp16") else "fp32"
        vae = vae if vae is not None else _load(role, ckpt, layout, opts)
        exported = export_decoder_stages(vae, stage, precision, opts.opset, prefix,
                                         encoder=half == "encoder")
        for name, files, _ in exported:
            components[name] = ComponentSpec(name, contract_of(kind).kind, "onnx", files[0],
                                             precision, file_entries(stage, files),
                                             *onnx_io(stage / files[0]))
        say(f"vae {half} stages: {len(exported)} ({precision}) in "
            f"{time.perf_counter() - t0:.1f} s")
        out.append(tuple(meta for _, _, meta in exported))
    return out[0], out[1]
