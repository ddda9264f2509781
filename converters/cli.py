"""`edge-convert`: convert a diffusers checkpoint into an edge-sdk bundle.

    edge-convert CHECKPOINT -o BUNDLE [--format onnx] [--precision fp32|fp16|unet=fp16,...]
    edge-convert verify BUNDLE --reference REF [--providers qnn]
    edge-convert synth --arch tiny-sd1|tiny-sd2|tiny-inpaint|tiny-lcm|sd15|sd15-lcm -o DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from typing import Sequence

from edge_sdk.cli import run_cli
from edge_sdk.errors import ConversionError

from . import __version__
from .options import DEFAULT_OPSET


def _decoder_arguments(p: argparse.ArgumentParser) -> None:
    """The extra decoders a bundle can carry beside the VAE's own."""
    p.add_argument("--tiny-vae", default=None, metavar="FOLDER",
                   help="a diffusers AutoencoderTiny folder (TAESD): its decoder is added as "
                        "a tiny decoder (`edge-sdk generate --decoder tiny`)")
    p.add_argument("--preview-decoder", default=None, metavar="FILE",
                   help="a preview decoder trained for this model (a .safetensors file, or "
                        "a folder holding preview_decoder.safetensors, e.g. "
                        "models/shapes/preview_decoder): it draws the live previews instead "
                        "of the linear map fitted at conversion")


def _calibration_arguments(p: argparse.ArgumentParser) -> None:
    """Static quantization's options: the int8 method, the prompts, the target PSNR."""
    p.add_argument("--int8-method", choices=["dynamic", "static"], default="dynamic",
                   help="int8 UNet: dynamic (weights only, activations quantized at run time) "
                   "or static QDQ calibrated on the model's own denoising trajectories (w8a8 "
                   "with dynamic shapes, for CPUs)")
    p.add_argument("--calibration", default=None, metavar="PROMPTS.txt",
                   help="prompts for static quantization's calibration (w8a8, w8a16, int8 "
                   "static, int8-full), one per line (default: a built-in set of 12)")
    p.add_argument("--target-psnr", type=float, default=None, metavar="DB",
                   help="static quantization: keep the most sensitive layers float until the "
                   "UNet's output holds this PSNR against fp32 on calibration inputs (the "
                   "layers are listed in the manifest and the verify report)")


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-convert", description="Convert a diffusers-format "
                                "Stable Diffusion checkpoint folder into an edge-sdk bundle. "
                                "(`edge-convert synth --help`: build a random-weight "
                                "checkpoint.)")
    p.add_argument("--version", action="version", version=f"edge-convert {__version__}")
    p.add_argument("checkpoint", help="diffusers checkpoint folder (model_index.json, unet/ "
                   "...) or single-file checkpoint (.safetensors; SD 1.x/2.x original layout)")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument("--format", default="onnx", choices=["onnx", "tflite"],
                   help="onnx (onnxruntime; any size) or tflite (LiteRT; static sizes, see "
                   "--sizes; needs the [tflite-convert] extra)")
    p.add_argument("--sizes", default=None, metavar="WxH,...",
                   help="tflite: image sizes the UNet and VAE are exported for, e.g. "
                   "512x512,512x768 (default: the model's native size); with w8a8/w8a16: "
                   "the one size an NPU's UNet is compiled for (static shapes, batch 1)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 | fp16 | int8 (text encoder + UNet; the VAE stays fp32) | int4 "
                   "(UNet int4, text encoder int8, VAE fp32) | w8a16, w8a8 (the UNet as "
                   "static QDQ for NPUs: int8 weights, 16- or 8-bit activations calibrated "
                   "on the model's own denoising; the rest fp32) | int8-full (--format "
                   "tflite: the UNet full integer, int8 weights and activations, float at "
                   "its edges, for Edge TPU / NNAPI-style delegates), or per component: "
                   "unet=int4,text_encoder=int8,vae=fp16")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    _decoder_arguments(p)
    stages = p.add_mutually_exclusive_group()
    stages.add_argument("--vae-stages", dest="vae_stages", action="store_true", default=None,
                        help="also export the VAE decoder as stages for exact tiled decoding "
                        "(the low-memory modes use them; adds the decoder's size again). "
                        "The default for ONNX; for TFLite it makes a mixed bundle")
    stages.add_argument("--no-vae-stages", dest="vae_stages", action="store_false",
                        help="no decoder stages: a smaller bundle that decodes whole (more "
                        "memory at large sizes)")
    _single_file_arguments(p)
    _customization_arguments(p)
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.ckpt weights (pickle: only for sources you trust)")
    p.add_argument("--export-cache", default=None, metavar="DIR",
                   help="tflite: keep each component's fp32 export in DIR and reuse it when the "
                   "same weights, sizes and converter are converted again (another "
                   "--precision costs only its quantization); fp32 files: SD 1.5's UNet alone "
                   "takes 3.4 GB")
    p.add_argument("--name", default=None,
                   help="the model's name in the manifest, shown by `edge-sdk info` and the "
                   "benchmarks (default: the checkpoint folder's name)")
    p.add_argument("--default-steps", type=int, default=None)
    p.add_argument("--default-guidance", type=float, default=None)
    p.add_argument("--no-vae-encoder", action="store_true", help="skip the VAE encoder")
    _feature_cache_arguments(p)
    _calibration_arguments(p)
    p.add_argument("--attention-chunks", default="auto", metavar="N|auto",
                   help="compute the UNet's self-attention in N query slices (peak attention "
                   "memory / N); auto: slices of 256 tokens for UNets with >= 2,048 tokens "
                   "at their native size (SD 1.5: 16), none for small ones; the VAE decoder's "
                   "mid-block attention 16 (it runs at the output size)")
    p.add_argument("--debug", action="store_true")
    return p


def _single_file_arguments(p: argparse.ArgumentParser) -> None:
    """How a single-file checkpoint is read when detection cannot tell, and --vae."""
    from .single_file import PREDICTION_TYPES
    from .single_file_layout import FAMILIES
    g = p.add_argument_group("single-file checkpoints")
    g.add_argument("--family", choices=FAMILIES, default=None,
                   help="the file's family, instead of detecting it from the tensors")
    g.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=None,
                   help="what the UNet predicts; required for SD 2.x files that do not say "
                   "(v_prediction: 768-px 2.0/2.1; epsilon: 2.x-base, 2.x inpainting)")
    g.add_argument("--config", default=None, metavar="DIR",
                   help="a diffusers-format folder with the unet/, vae/ and text_encoder/ "
                   "configs (tokenizer/, scheduler/ optional) of another architecture")
    g.add_argument("--vae", default=None, metavar="FILE",
                   help="a separately published VAE (.safetensors, original or diffusers "
                   "layout) replacing the checkpoint's; folders too")


def _customization_arguments(p: argparse.ArgumentParser) -> None:
    """What is added to the checkpoint's weights: LoRAs, embeddings, ControlNets."""
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (.safetensors, kohya/A1111 or diffusers/PEFT keys) fused into "
                   "the UNet and text encoder at SCALE (default 1); repeatable")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding (A1111 .safetensors, or .pt with "
                   "--allow-pickle; diffusers' learned_embeds) added as new tokens: the "
                   "file's name is the trigger word (A1111); repeatable")
    p.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="a ControlNet for this model (a diffusers ControlNetModel folder, or "
                   "a single file in the original layout) added to the bundle; repeatable: "
                   "generations take one control image per ControlNet, in this order. "
                   "Precision: the UNet's (or --precision ...,controlnet=P)")


def _feature_cache_arguments(p: argparse.ArgumentParser) -> None:
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--feature-cache", dest="feature_cache", action="store_true",
                       default=None, help="export the UNet's shallow branch for feature "
                       "caching (`edge-sdk generate --cache-interval N`); the default for "
                       "ONNX where the UNet can be split (SD 1.5: 2.2 %% more bytes); an error "
                       "where it cannot")
    cache.add_argument("--no-feature-cache", dest="feature_cache", action="store_false",
                       help="no shallow branch: the bundle cannot cache features")


def _synth_parser() -> argparse.ArgumentParser:
    from .synth import ARCHS
    p = argparse.ArgumentParser(prog="edge-convert synth", description="Write a Stable "
                                "Diffusion-architecture checkpoint with random weights "
                                "(offline, seeded): tiny ones for tests, sd15 for benchmarks.")
    p.add_argument("--arch", choices=ARCHS, default="tiny-sd1")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--controlnet-for", default=None, metavar="CHECKPOINT",
                   help="instead: a ControlNet for this checkpoint folder's UNet (random "
                   "weights, its zero convolutions too, so it steers)")
    p.add_argument("--debug", action="store_true")
    return p


def _verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-convert verify", description="Measure what a bundle "
                                "(fp16, int8 ...) costs against a reference: per component "
                                "error, size and latency; PSNR/SSIM of final images. Writes "
                                "BUNDLE/quality.json.")
    p.add_argument("bundle")
    p.add_argument("--reference", "-r", required=True,
                   help="a checkpoint folder (converted to fp32 on the fly) or an fp32 bundle")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--evaluate", action="store_true",
                   help="also score both bundles on the shapes model's held-out prompts "
                   "(edge-sdk evaluate) and report the whole-prompt accuracy of each")
    p.add_argument("--providers", default=None, metavar="EP",
                   help="also report where a plugin execution provider (qnn) "
                   "places each component's nodes and which op types fall back to the CPU")
    p.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for --providers (repeatable)")
    p.add_argument("--debug", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = argv[0] if argv and argv[0] in ("synth", "verify") else None
    parser = {"synth": _synth_parser, "verify": _verify_parser}.get(sub or "", _convert_parser)()
    args = parser.parse_args(argv[1:] if sub else argv)
    action = {"synth": _synth, "verify": _verify}.get(sub or "", _convert)
    # SIGTERM (a service stopping, `kill`) unwinds like Ctrl-C: the staging folder is removed
    return run_cli(lambda: action(_require_convert_extra(args)), args.debug,
                   interrupted="interrupted; no partial bundle was left")


def _require_convert_extra(args: argparse.Namespace) -> argparse.Namespace:
    """The converter's packages are an extra: say which, not ModuleNotFoundError: torch."""
    missing = [m for m in ("torch", "diffusers", "transformers", "onnx", "accelerate")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ConversionError(f"edge-convert needs the [convert] extra ({', '.join(missing)} "
                              "missing): `pip install torch==2.13.0 && pip install "
                              "'.[convert]'` in a clone of edge-sdk")
    return args


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_sdk.cli_common import pairs

    from .verify import format_report, verify
    prompts = None
    if args.prompts:
        prompts = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    report = verify(args.bundle, args.reference, prompts=prompts, steps=args.steps,
                    evaluate=args.evaluate, providers=args.providers,
                    provider_options=pairs(args.provider_option, "--provider-option"))
    print(format_report(report))
    print(f"written to {Path(args.bundle) / 'quality.json'}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from .synth import build_checkpoint, build_controlnet
    t0 = time.perf_counter()
    if args.controlnet_for:
        build_controlnet(args.output, args.controlnet_for, args.seed)
        what = f"a ControlNet for {args.controlnet_for}"
    else:
        build_checkpoint(args.output, args.arch, args.seed)
        what = f"{args.arch} checkpoint"
    print(f"wrote {what} to {args.output} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from edge_sdk.lora import parse_lora_arg

    from .convert import ConvertOptions, convert
    t0 = time.perf_counter()
    options = ConvertOptions(
        fmt=args.format, precision=args.precision, overwrite=args.overwrite,
        allow_pickle=args.allow_pickle, opset=args.opset, default_steps=args.default_steps,
        default_guidance=args.default_guidance, vae_encoder=not args.no_vae_encoder,
        tiny_vae=args.tiny_vae, preview_decoder=args.preview_decoder,
        feature_cache=args.feature_cache, int8_method=args.int8_method, vae_stages=args.vae_stages,
        target_psnr=args.target_psnr,
        attention_chunks=args.attention_chunks, sizes=args.sizes,
        export_cache=args.export_cache,
        calibration=args.calibration, name=args.name,
        loras=tuple(parse_lora_arg(x) for x in args.lora), embeddings=tuple(args.embedding),
        family=args.family, prediction_type=args.prediction_type, config=args.config,
        vae=args.vae, controlnets=tuple(args.controlnet))
    convert(args.checkpoint, args.output, options,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"converted in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
