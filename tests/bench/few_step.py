"""Few steps and a tiny decoder on the SD 1.5 architecture (full-size configs, random weights:
speed and memory as with real ones), 512x512, edge-sdk and diffusers in one run.

    python -m tests.bench.few_step [--work /tmp/edge-sdk-few-step] [--only decode;speed]
        [--runs 1] [--json FILE]

Builds what is missing under --work: the `sd15` and `sd15-lcm` checkpoints
(converters.synth; the LCM one has SD 1.5's UNet with a 256-wide guidance embedding and
LCMScheduler), a TAESD-architecture AutoencoderTiny with random weights, and an fp32 bundle
of each checkpoint with that tiny decoder (`--tiny-vae`). Every row runs in a process of its
own.

- decode: the full and the tiny decoder on the same 64x64 latents, `memory="fast"`, untiled:
  median seconds of 3 decodes after a warm-up, and the decoder's peak private memory (its
  weights, arena and activations: the process's peak private memory over what it held
  before the decoder was opened).
- cache: feature caching, in one process: 20 steps every step whole and with
  `cache_interval=3`, the same seeds; the UNet (denoising) time of each, time to image, and
  the PSNR of the cached image against the whole one.
- speed: time to image, load excluded (text encoder + steps + decode; median of --runs after a
  1-step warm-up): edge-sdk fp32 `memory="fast"`, 20 steps of the checkpoint's PNDM at guidance
  7.5 with the full decoder, and 4 LCM steps at guidance 8.5 with the tiny decoder; diffusers
  doing the same two with its default (fastest) settings: torch fp32, SDPA attention, no
  slicing or tiling; StableDiffusionPipeline, and LatentConsistencyModelPipeline with
  `vae=AutoencoderTiny`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

PROMPT = "a photograph of a lighthouse on a cliff at sunset"
SIZE, LATENT = 512, 64
FULL = dict(steps=20, guidance=7.5)
LCM = dict(steps=4, guidance=8.5)


def prepare(work: Path) -> dict[str, Path]:
    from converters.convert import convert
    from converters.synth import build_checkpoint, build_tiny_vae
    p = {"sd15": work / "sd15", "sd15-lcm": work / "sd15-lcm", "taesd": work / "taesd",
         "bundle": work / "bundle-fp32", "bundle-lcm": work / "bundle-lcm-fp32"}
    for arch in ("sd15", "sd15-lcm"):
        if not (p[arch] / "model_index.json").exists():
            build_checkpoint(p[arch], arch, seed=0)
    if not (p["taesd"] / "config.json").exists():
        build_tiny_vae(p["taesd"])
    for ckpt, out in ((p["sd15"], p["bundle"]), (p["sd15-lcm"], p["bundle-lcm"])):
        manifest = out / "manifest.json"  # (the 20-step one with feature caching's graphs)
        if not manifest.exists() or (out == p["bundle"]
                                     and '"unet_shallow"' not in manifest.read_text()):
            convert(ckpt, out, precision="fp32", tiny_vae=p["taesd"], vae_encoder=False,
                    vae_stages=False, overwrite=True)
    return p


def child_decode(bundle: Path, decoder: str, runs: int) -> dict[str, Any]:
    """One decoder alone in this process, as the pipeline's fast plan opens it."""
    from dataclasses import replace

    import numpy as np

    from edge_sdk import GenerationConfig, names
    from edge_sdk.backends import BackendOptions
    from edge_sdk.bench import _PeakSampler, process_memory
    from edge_sdk.components import Components
    from edge_sdk.manifest import Manifest
    from edge_sdk.memory import plan_memory
    from edge_sdk.vae import decode_latents, decode_latents_tiny
    m = Manifest.load(bundle)
    plan = plan_memory("fast", m, GenerationConfig(seed=0).resolve(m))
    options = BackendOptions.checked("auto", None, None, False, None, None)
    comps = Components(bundle, m, replace(options, low_memory=plan.map_weights), plan)
    z = np.random.default_rng(0).standard_normal((1, 4, LATENT, LATENT), dtype=np.float32)
    before = process_memory().get("RssAnon", 0)
    times = []
    with _PeakSampler() as sampler:
        for _ in range(runs + 1):  # the first opens the session: a warm-up
            t0 = time.perf_counter()
            if decoder == "tiny":
                decode_latents_tiny(comps.session(names.VAE_DECODER_TINY), z,
                                    m.vae.tiny_scaling_factor)
            else:
                decode_latents(comps.session(names.VAE_DECODER), z, m.vae)
            times.append(time.perf_counter() - t0)
    return {"decode_s": statistics.median(times[1:]), "first_s": times[0],
            "peak_private_bytes": sampler.peak - before}


def child_ours(bundle: Path, steps: int, guidance: float, decoder: str,
               runs: int) -> dict[str, Any]:
    from edge_sdk import GenerationConfig, Pipeline
    pipe = Pipeline.load(bundle, memory="fast")
    kw = dict(width=SIZE, height=SIZE, guidance_scale=guidance, decoder=decoder)
    pipe.generate(PROMPT, GenerationConfig(steps=1, seed=0, **kw))  # warm-up
    totals, stages = [], []
    for k in range(runs):
        r = pipe.generate(PROMPT, GenerationConfig(steps=steps, seed=k, **kw))
        totals.append(sum(v for s, v in r.timings.items() if s != "prepare"))
        stages.append(r.timings)
    return {"total_s": statistics.median(totals), "timings": stages[-1]}


def child_cache(bundle: Path, interval: int, runs: int) -> dict[str, Any]:
    """20 steps with every step whole and with `cache_interval`, side by side in this
    process, the same seeds: the UNet (denoising) time, time to image, and the PSNR of each
    cached image against its uncached twin."""
    import numpy as np

    from edge_sdk import GenerationConfig, Pipeline
    pipe = Pipeline.load(bundle, memory="fast")
    kw = dict(width=SIZE, height=SIZE, guidance_scale=FULL["guidance"], steps=FULL["steps"])
    pipe.generate(PROMPT, GenerationConfig(seed=0, cache_interval=interval,
                                           **{**kw, "steps": 2}))  # warm-up, both graphs
    out: dict[str, list[float]] = {"unet_s": [], "unet_cached_s": [], "total_s": [],
                                   "total_cached_s": [], "psnr_db": []}
    for k in range(runs):
        images = []
        for n, suffix in ((1, ""), (interval, "_cached")):
            r = pipe.generate(PROMPT, GenerationConfig(seed=k, cache_interval=n, **kw),
                              output_type="np")
            out["unet" + suffix + "_s"].append(r.timings["denoise"])
            out["total" + suffix + "_s"].append(sum(v for s, v in r.timings.items()
                                                    if s != "prepare"))
            images.append(np.round(np.asarray(r.images[0]) * 255))
        mse = float(np.mean((images[0] - images[1]) ** 2))
        out["psnr_db"].append(10 * float(np.log10(255.0 ** 2 / max(mse, 1e-12))))
    result: dict[str, Any] = {k: statistics.median(v) for k, v in out.items()}
    result["unet_ratio"] = result["unet_cached_s"] / result["unet_s"]
    result["interval"] = interval
    return result


def child_diffusers(ckpt: Path, steps: int, guidance: float, taesd: Path | None,
                    runs: int) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderTiny, DiffusionPipeline
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    pipe = DiffusionPipeline.from_pretrained(ckpt, local_files_only=True)
    if taesd is not None:
        pipe.vae = AutoencoderTiny.from_pretrained(taesd, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=SIZE, width=SIZE, guidance_scale=guidance)
    totals = []
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=1, **kw)  # warm-up
        for k in range(runs):
            t0 = time.perf_counter()
            pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(k),
                 **kw)
            totals.append(time.perf_counter() - t0)
    return {"total_s": statistics.median(totals), "pipeline": type(pipe).__name__}


def rows(p: dict[str, Path], runs: int) -> dict[str, list[str]]:
    me = [sys.executable, "-m", "tests.bench.few_step", "--runs", str(runs)]
    return {
        "decode: full decoder": me + ["--child", "decode", "--path", str(p["bundle"]),
                                      "--decoder", "full"],
        "decode: tiny decoder": me + ["--child", "decode", "--path", str(p["bundle"]),
                                      "--decoder", "tiny"],
        "speed: edge-sdk, 20 steps, full decoder": me + [
            "--child", "ours", "--path", str(p["bundle"]), "--decoder", "full", "--lcm", "0"],
        "speed: edge-sdk, 4 LCM steps, tiny decoder": me + [
            "--child", "ours", "--path", str(p["bundle-lcm"]), "--decoder", "tiny", "--lcm", "1"],
        "cache: edge-sdk, 20 steps, cache_interval 3 vs 1": me + [
            "--child", "cache", "--path", str(p["bundle"]), "--lcm", "0"],
        "speed: diffusers, 20 steps, full decoder": me + [
            "--child", "diffusers", "--path", str(p["sd15"]), "--lcm", "0"],
        "speed: diffusers, 4 LCM steps, AutoencoderTiny": me + [
            "--child", "diffusers", "--path", str(p["sd15-lcm"]), "--taesd", str(p["taesd"]),
            "--lcm", "1"]}


def _child(args: argparse.Namespace) -> dict[str, Any]:
    path, mode = Path(args.path), LCM if args.lcm else FULL
    if args.child == "decode":
        return child_decode(path, args.decoder, 3)
    if args.child == "cache":
        return child_cache(path, 3, args.runs)
    if args.child == "ours":
        return child_ours(path, mode["steps"], mode["guidance"], args.decoder, args.runs)
    return child_diffusers(path, mode["steps"], mode["guidance"],
                           Path(args.taesd) if args.taesd else None, args.runs)


def _run(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: dict[str, dict[str, Any]], runs: int) -> None:
    mib = 2 ** 20
    print(f"\nSD 1.5 architecture (random weights), {SIZE}x{SIZE}; {platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} cores, {date.today().isoformat()}\n")
    full, tiny = results.get("decode: full decoder"), results.get("decode: tiny decoder")
    if full and tiny and "error" not in full and "error" not in tiny:
        print("| decoder (fast, untiled) | decode s (median of 3) | peak private |\n|---|---|---|")
        for name, r in (("full", full), ("tiny", tiny)):
            print(f"| {name} | {r['decode_s']:.3f} | {r['peak_private_bytes'] / mib:.0f} MiB |")
        print(f"\ntiny / full: time {tiny['decode_s'] / full['decode_s']:.4f}, peak private "
              f"{tiny['peak_private_bytes'] / full['peak_private_bytes']:.4f}\n")
    cache = results.get("cache: edge-sdk, 20 steps, cache_interval 3 vs 1")
    if cache and "error" not in cache:
        print(f"feature caching, 20 steps, one process, median of {runs}: UNet "
              f"{cache['unet_s']:.1f} s whole vs {cache['unet_cached_s']:.1f} s with "
              f"cache_interval {cache['interval']} (ratio {cache['unet_ratio']:.3f}); time "
              f"to image {cache['total_s']:.1f} vs {cache['total_cached_s']:.1f} s; PSNR of "
              f"the cached image vs the whole one {cache['psnr_db']:.1f} dB\n")
    print(f"| time to image (load excluded; median of {runs}) | s |\n|---|---|")
    for name, r in results.items():
        if name.startswith("speed"):
            value = f"{r['total_s']:.1f}" if "total_s" in r else f"failed: {r['error']}"
            print(f"| {name[7:]} | {value} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edge-sdk-few-step")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--only", default=None, help="';'-separated row name prefixes to run "
                    "(\"decode\", \"speed: diffusers\")")
    ap.add_argument("--json", default=None, help="also write the rows here")
    for hidden in ("--child", "--path", "--decoder", "--taesd", "--lcm"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.lcm = bool(int(args.lcm or 0))
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    wanted = set(args.only.split(";")) if args.only else None
    results = {}
    for name, cmd in rows(prepare(Path(args.work)), args.runs).items():
        if not wanted or any(name.startswith(w) for w in wanted):
            results[name] = _run(cmd)
            print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    report(results, args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
