"""`edge-sdk`: generate images and inspect bundles from the command line.

The CLI owns printing: library errors become one line on stderr and a non-zero exit
(`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from . import names as N
from .config import MAX_IMAGES, add_arguments, config_from_arguments
from .errors import EdgeSDKError, InvalidInputError
from .cli_control import add_control_args, control_maps, save_control
from .cli_common import MODEL_HELP, add_backend_args, add_memory_arg, backend_kwargs
from .cli_evaluate import cmd_evaluate, evaluate_parser
from .cli_serve import cmd_serve, serve_parser
from .progress import ProgressBar


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-sdk", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edge-sdk {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _generate_parser(sub.add_parser("generate", help="generate an image from a text prompt"))
    evaluate_parser(sub.add_parser("evaluate", help="score a bundle on the shapes model's "
                                    "held-out prompts"))
    i = sub.add_parser("info", help="describe a bundle")
    i.add_argument("bundle", nargs="?", help=MODEL_HELP)
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.add_argument("--providers", default=None, metavar="EP", help="also report where a "
                   "plugin execution provider (qnn) places each component's nodes "
                   "and which op types fall back to the CPU (compiles the graphs)")
    i.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an option for --providers (repeatable)")
    i.add_argument("--debug", action="store_true")
    _bench_parser(sub.add_parser("bench", help="time one generation per stage and per UNet "
                                 "step, with peak RSS and peak private memory"))
    serve_parser(sub.add_parser("serve", help="serve images over HTTP: AUTOMATIC1111's and "
                                "OpenAI's APIs (the [serve] extra)"))
    s = sub.add_parser("schedulers", help="list the accepted --scheduler names")
    s.add_argument("--debug", action="store_true")
    t = sub.add_parser("selftest", help="generate with the shipped model and check the image "
                       "(the smoke test of an install, a board or a container)")
    t.add_argument("--model", "-m", help=MODEL_HELP)
    add_memory_arg(t)
    add_backend_args(t)
    t.add_argument("-o", "--output", default=None, help="also save the image here")
    t.add_argument("--debug", action="store_true")
    return p


def _generate_parser(g: argparse.ArgumentParser) -> None:
    g.add_argument("prompt")
    g.add_argument("--model", "-m", help=MODEL_HELP)
    g.add_argument("-o", "--output", default="out.png",
                   help="image path, .png (parameters in text chunks) or .jpg (default: "
                   "out.png); with --num-images N: NAME-0.png ... NAME-<N-1>.png, image k "
                   "made with seed + k (generate it alone with that seed to get it again)")
    _add_image_args(g)
    add_control_args(g)
    add_arguments(g)  # every generation parameter (edge_sdk.config.GenerationConfig)
    add_backend_args(g)
    g.add_argument("--no-verify", action="store_true", help="skip sha256 checks at load")
    add_memory_arg(g)
    g.add_argument("--preview", default=None, metavar="PATH.png", help="write a quick "
                   "preview of the image here as it is denoised (rewritten atomically)")
    g.add_argument("--preview-every", type=int, default=1, metavar="N",
                   help="with --preview: every N steps (default 1) and at the last")
    g.add_argument("--preview-source", default="auto", choices=("auto", "map", "tiny"),
                   help="with --preview: what draws it (map: the bundle's preview decoder or "
                   "linear map, the cheapest; tiny: its tiny decoder, sharper and ~8 %% of an "
                   "SD 1.5 step; auto: the map, else the tiny decoder in memory mode fast)")
    g.add_argument("-q", "--quiet", action="store_true")
    g.add_argument("--json", action="store_true", help="print the result (paths, seeds, "
                   "parameters, seconds per stage) as JSON on stdout")
    g.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _bench_parser(b: argparse.ArgumentParser) -> None:
    b.add_argument("prompt", nargs="?", default="a red circle on a blue background")
    b.add_argument("--model", "-m", help=MODEL_HELP)
    add_arguments(b, only=("negative_prompt", "steps", "guidance_scale", "width", "height",
                           "seed", "scheduler", "strength", "decoder", "cache_interval",
                           "controlnet_conditioning_scale"))
    _add_image_args(b)
    add_control_args(b)
    b.set_defaults(seed=0)  # a benchmark is repeatable by default
    add_memory_arg(b)
    add_backend_args(b)
    b.add_argument("--output", "-o", default=None, help="also save the image here (PNG)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    b.add_argument("--debug", action="store_true")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", default=None, metavar="PATH", help="img2img: start from this "
                   "image (PNG/JPEG; the output takes its size, rounded down to a multiple "
                   "of 8, unless --width/--height are given)")
    p.add_argument("--mask", default=None, metavar="PATH", help="inpainting: repaint where "
                   "this mask (the image's size) is white")


def _output_paths(output: str, n: int) -> list[Path]:
    path = Path(output)
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{k}{path.suffix or '.png'}") for k in range(n)]


def cmd_generate(a: argparse.Namespace) -> int:
    from .image import check_output_path, save_png
    from .pipeline import Pipeline
    from .preview import Preview

    n = a.num_images if isinstance(a.num_images, int) and 0 < a.num_images <= MAX_IMAGES \
        else 1  # out of range: generate refuses it, after these paths are checked
    paths = [check_output_path(p) for p in _output_paths(a.output, n)]  # before any work
    if a.save_control:
        check_output_path(a.save_control, {".png": "PNG"})
    maps = control_maps(a)
    preview = None
    if a.preview:
        where = check_output_path(a.preview, {".png": "PNG"})
        if where.resolve() in {p.resolve() for p in paths}:
            raise InvalidInputError(f"--preview {a.preview} is also an output image; give "
                                    "the preview its own file")
        preview = Preview(lambda step, image: save_png(image, where, {"step": step + 1}),
                          a.preview_every, a.preview_source)
        if a.preview_every < 1:  # before the bundle loads
            raise InvalidInputError(f"--preview-every must be a whole number of steps >= 1, "
                                    f"got {a.preview_every}")
    elif a.preview_every != 1 or a.preview_source != "auto":
        raise InvalidInputError("--preview-every and --preview-source are for --preview "
                                "PATH.png; add it, or drop them")
    t0 = time.perf_counter()
    pipe = Pipeline.load(a.model, verify=not a.no_verify, memory=a.memory, **backend_kwargs(a))
    load_s = time.perf_counter() - t0
    result = pipe.generate(a.prompt, config_from_arguments(a), image=a.image,
                           mask_image=a.mask, preview=preview,
                           control_image=maps,
                           callback=ProgressBar("denoising", not (a.quiet or a.json)))
    if maps and a.save_control:
        save_control(maps, a.save_control, int(result.config.width or 0),
                     int(result.config.height or 0), _output_paths)
    images = []
    for k, (image, path) in enumerate(zip(result.images, paths)):
        params = {**result.image_parameters(k), "model": pipe.manifest.source.name,
                  "edge_sdk": __version__, **({"loras": pipe.loras} if pipe.loras else {})}
        save_png(image, path, params)
        images.append({"path": str(path), "seed": params["seed"]})
    t = {"load": load_s, **result.timings}
    if a.json:
        print(json.dumps({"images": images, "parameters": result.config.as_dict(),
                          "model": pipe.manifest.source.name, "seconds": t}, indent=1))
    elif not a.quiet:
        c = result.config
        edit = f", strength {c.strength}" if c.strength is not None else ""
        encode = f", encode {t['vae_encoder']:.2f} s" if "vae_encoder" in t else ""
        print(f"wrote {', '.join(map(str, paths))} ({c.width}x{c.height}, seed "
              f"{', '.join(str(i['seed']) for i in images)}, {c.steps} steps, {c.scheduler}"
              f"{edit}) load {load_s:.2f} s, text {t['text_encoder']:.2f} s{encode}, denoise "
              f"{t['denoise']:.2f} s, decode {t['vae_decoder']:.2f} s")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench
    from .pipeline import Pipeline

    from .image import check_output_path, save_png
    if a.output:
        check_output_path(a.output)
    config = config_from_arguments(a)
    kwargs = backend_kwargs(a)
    maps = control_maps(a)
    report, result = run_bench(a.prompt, config, lambda: Pipeline.load(
        a.model, memory=a.memory, **kwargs), image=a.image, mask_image=a.mask,
        control_image=maps)
    if a.output:
        save_png(result.images[0], a.output, result.parameters)
    print(json.dumps(report.as_dict(), indent=1) if a.json else report.table())
    return 0


SELFTEST_PROMPT, SELFTEST_SEED = "a red circle on a blue background", 0


def cmd_selftest(a: argparse.Namespace) -> int:
    """Exit 0 when the evaluator sees the prompt's colour and background in the image."""
    import platform

    import numpy as np

    from .config import GenerationConfig
    from .image import save_png
    from .pipeline import Pipeline
    from .shapes import is_shapes_model
    from .shapes.evaluator import analyse

    t0 = time.perf_counter()
    if a.output:
        from .image import check_output_path
        check_output_path(a.output)
    pipe = Pipeline.load(a.model, memory=a.memory, **backend_kwargs(a))
    load_s = time.perf_counter() - t0
    result = pipe.generate(SELFTEST_PROMPT, GenerationConfig(seed=SELFTEST_SEED))
    if a.output:
        save_png(result.images[0], Path(a.output), result.parameters)
    print(f"machine {platform.machine()}, python {platform.python_version()}, "
          f"edge-sdk {__version__}, model {pipe.manifest.source.name!r}")
    timing = f"load {load_s:.2f} s, generate {sum(result.timings.values()):.2f} s"
    if not is_shapes_model(pipe.manifest):  # the evaluator cannot judge another model's image
        print(f"{SELFTEST_PROMPT!r} seed {SELFTEST_SEED}: a {result.config.width}x"
              f"{result.config.height} image generated; {timing}")
        print("selftest PASS (generation only: the image check is for the shapes model)")
        return 0
    seen = analyse(np.asarray(result.images[0]))
    ok = seen.colour == "red" and seen.background == "blue"
    print(f"{SELFTEST_PROMPT!r} seed {SELFTEST_SEED}: evaluator sees {seen.colour} "
          f"{seen.shape} on {seen.background} (count {seen.count}, {seen.position}); {timing}")
    print("selftest " + ("PASS" if ok else "FAIL: expected red on blue"))
    return 0 if ok else 1


def cmd_info(a: argparse.Namespace) -> int:
    from .manifest import Manifest
    from .models import default_bundle, resolve_model

    path = resolve_model(a.bundle) if a.bundle else default_bundle()
    m = Manifest.load(path)
    if a.json:
        print(m.to_json(), end="")
        return 0
    print("\n".join(describe(m, path)))
    if a.providers:
        from .backends.readiness import bundle_readiness
        from .cli_common import pairs
        print(f"placement on {a.providers}")
        for line in bundle_readiness(path, m, a.providers,
                                     pairs(a.provider_option, "--provider-option")):
            print("  " + line)
    return 0


def _text_lines(m: Any) -> list[str]:
    """The tokenizers, and how an SDXL bundle reads its two text encoders."""
    lines = [f"{role:<11} {t.max_length} tokens, pad {t.pad_token!r} (id {t.pad_token_id})"
             + (f", for {t.text_encoder}" if len(m.tokenizers) > 1 else "")
             for role, t in m.tokenizers.items()]
    if m.text.penultimate or len(m.text.encoders) > 1:
        lines.append(f"text        {' + '.join(m.text.encoders)}, penultimate layers"
                     + (f", pooled from {m.text.pooled}" if m.text.pooled else "")
                     + (", zeros for no negative prompt"
                        if m.text.force_zeros_for_empty_prompt else ""))
    return lines


def describe(m: Any, path: Path) -> list[str]:
    """The manifest in human form."""
    s, c, d = m.source, m.converter, m.defaults
    sched = m.scheduler
    lines = [
        f"bundle      {path}",
        f"model       {m.family} ({m.variant}), from {s.name!r} ({s.pipeline_class}, "
        f"diffusers {s.diffusers_version})",
        f"source      sha256 {s.fingerprint[:16]}...",
        f"format      {m.format_version}" + (
            f" (read from format {m.migrated_from}: {N.RECONVERT_HINT})" if m.migrated_from
            else ""),
        f"converted   {c.get('name')} {c.get('version')} on {c.get('created')}, "
        + (f"litert-torch {c['litert-torch']}" if "litert-torch" in c
           else f"opset {c.get('opset')}"),
        f"scheduler   {sched.get('_class_name')} (prediction {m.prediction_type}, "
        f"{sched.get('beta_schedule')} betas, spacing {sched.get('timestep_spacing')}, "
        f"steps_offset {sched.get('steps_offset', 0)})",
        f"defaults    {d.width}x{d.height}, {d.steps} steps, guidance {d.guidance_scale}"
        + (", static sizes " + ", ".join(f"{w}x{h}" for h, w in m.static_sizes)
           if m.static_sizes else ""),
        f"vae         scaling {m.vae.scaling_factor}"
        + (f", shift {m.vae.shift_factor}" if m.vae.shift_factor is not None else "")
        + f", {m.vae.latent_channels} latent channels, x{m.vae.scale_factor}",
        *_text_lines(m),
        *([f"controlnets {', '.join(f'{c.name} ({c.component})' for c in m.controlnets)}; "
           f"the UNet takes {len(m.unet.residuals)} residuals"] if m.controlnets else []),
        "components",
    ]
    width = len(N.TEXT_ENCODER_2)  # the longest main role; stages' longer names overflow
    for comp in m.components.values():
        size = sum(f.size for f in comp.files) / 1e6
        ios = " ".join(f"{t.name}:{t.dtype}[{','.join(map(str, t.shape))}]" for t in comp.inputs)
        outs = " ".join(f"{t.name}:{t.dtype}[{','.join(map(str, t.shape))}]"
                        for t in comp.outputs)
        lines.append(f"  {comp.name:<{width}} {comp.format} {comp.precision:<5} {size:8.1f} MB  "
                     f"{ios} -> {outs}")
    static = m.converter.get("static_quantization")
    if isinstance(static, dict):
        kind = "full int" if static.get("scheme") == N.FULL_INT else "static QDQ"
        lines.append(f"{kind:<10}  {static.get('scheme')}, {static.get('calibration_inputs')} "
                     f"calibration inputs" + (
                         f", {len(static.get('fallback_layers', []))} layers float for "
                         f"{static['target_psnr']} dB (reached {static.get('output_psnr')})"
                         if "target_psnr" in static else ""))
    quality = path / N.QUALITY_FILE
    if quality.is_file():
        try:
            q = json.loads(quality.read_text())
            e = q["end_to_end"]
            lines.append(f"quality     vs {q['reference']}: PSNR {e['psnr']:.2f} dB, SSIM "
                         f"{e['ssim']:.4f}, max abs {e['max_abs']}/255 over "
                         f"{len(e['images'])} images; UNet step {e['unet_step_seconds'] * 1e3:.1f}"
                         f" ms (reference {e['reference_unet_step_seconds'] * 1e3:.1f} ms)")
        except (ValueError, KeyError, TypeError):
            lines.append(f"quality     {N.QUALITY_FILE} is unreadable; re-run edge-convert verify")
    return lines


def cmd_schedulers(a: argparse.Namespace) -> int:
    """Each accepted name with the diffusers class it runs."""
    from .schedulers import resolve_scheduler, scheduler_names
    for name in scheduler_names():
        cls, _ = resolve_scheduler(name, {})
        print(f"{name:<34} {cls.class_name}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "generate": cmd_generate, "evaluate": cmd_evaluate, "info": cmd_info,
    "selftest": cmd_selftest, "bench": cmd_bench, "schedulers": cmd_schedulers,
    "serve": cmd_serve}


class Terminated(KeyboardInterrupt):
    """SIGTERM (`docker stop`, a service manager, `kill`), unwound like Ctrl-C."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def run_cli(action: Callable[[], int], debug: bool,
            interrupted: str = "interrupted") -> int:
    """Run a CLI action: logging set up, edge_sdk errors as one line on stderr and exit 2
    (the traceback with --debug), Ctrl-C as exit 130 and SIGTERM as 143 (128 + the signal),
    both unwinding so that nothing half-written is left. Shared by edge-convert."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # as PID 1 in a container, a process that leaves SIGTERM at its default ignores it
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return action()
    except EdgeSDKError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(interrupted, file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    except BrokenPipeError:  # `edge-sdk bench --json | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 0
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(lambda: COMMANDS[args.command](args), getattr(args, "debug", False))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
