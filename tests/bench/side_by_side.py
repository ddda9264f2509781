"""Side by side on one SD 1.5-architecture checkpoint (full-size configs, random weights):
our runtime in each memory mode, diffusers on CPU, and a plain onnxruntime session.

    python -m tests.bench.side_by_side [--work /tmp/edge-sdk-sd15] [--steps 3] [--size 512]

Builds what is missing under --work (the checkpoint with converters.synth, an int8 and an
fp32 bundle with edge-convert), then runs each engine in a process of its own so that its
peak RSS (VmHWM) is its own, and prints seconds per UNet step (median; guidance 7.5, so a
step is a batch-2 UNet call or two batch-1 calls) and peak RSS as a table (and --json).

- edge-sdk: `edge-sdk bench --memory fast|balanced|low` on the int8 bundle (int8 UNet and
  text encoder) and `balanced` on the fp32 bundle.
- diffusers: StableDiffusionPipeline in torch fp32 with attention slicing and VAE tiling on
  (tiles of 256 px, else a 512 px image is decoded whole).
- onnxruntime: the fp32 bundle's unet.onnx in an InferenceSession with default options
  (what a user who loads the graph themselves gets), batch 2, UNet calls only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

PROMPT = "a photograph of a lighthouse on a cliff at sunset"


def _peak_rss() -> int:
    from edge_sdk.bench import process_memory
    return process_memory().get("VmHWM", 0)


def child_diffusers(ckpt: Path, steps: int, size: int) -> dict[str, Any]:
    import torch
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    pipe = StableDiffusionPipeline.from_pretrained(ckpt, local_files_only=True)
    pipe.enable_attention_slicing()
    pipe.vae.enable_tiling()
    pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size = 256, 32
    pipe.set_progress_bar_config(disable=True)
    stamps = [time.perf_counter()]

    def on_step(_pipe: Any, _i: int, _t: Any, kwargs: dict) -> dict:
        stamps.append(time.perf_counter())
        return kwargs

    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
             generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step)
    # the first stamp is before the text encoder: drop that interval from the steps
    return {"unet_step_s": [b - a for a, b in zip(stamps[1:], stamps[2:])],
            "peak_rss_bytes": _peak_rss()}


def child_ort(graph: Path, steps: int, size: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime as ort

    from edge_sdk.manifest import Manifest
    unet = Manifest.load(graph.parent).unet
    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shape = (2, unet.in_channels, size // 8, size // 8)
    feeds = {"sample": rng.standard_normal(shape, dtype=np.float32),
             "timestep": np.array([999.0, 999.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, unet.cross_attention_dim),
                                                          dtype=np.float32)}
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return {"unet_step_s": times, "peak_rss_bytes": _peak_rss()}


def prepare(work: Path, arch: str = "sd15") -> tuple[Path, Path, Path]:
    from converters.convert import convert
    from converters.synth import build_checkpoint
    ckpt, int8, fp32 = work / "sd15", work / "bundle-int8", work / "bundle-fp32"
    if not (ckpt / "model_index.json").exists():
        build_checkpoint(ckpt, arch, seed=0)
    for out, precision in ((int8, "int8"), (fp32, "fp32")):
        if not (out / "manifest.json").exists():
            convert(ckpt, out, precision=precision, vae_encoder=False, vae_stages=True,
                    overwrite=True)
    return ckpt, int8, fp32


def _run(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edge-sdk-sd15")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--arch", default="sd15", help=argparse.SUPPRESS)  # tiny-sd1: smoke test
    ap.add_argument("--only", default=None, help="';'-separated parts of row names to run")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--child", choices=["diffusers", "ort"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = child_diffusers if args.child == "diffusers" else child_ort
        print(json.dumps(fn(Path(args.path), args.steps, args.size)))
        return 0
    ckpt, int8, fp32 = prepare(Path(args.work), args.arch)
    me = [sys.executable, "-m", "tests.bench.side_by_side", "--steps", str(args.steps),
          "--size", str(args.size)]

    def ours(bundle: Path, mode: str) -> list[str]:
        return [sys.executable, "-m", "edge_sdk.cli", "bench", PROMPT, "--model", str(bundle),
                "--memory", mode, "--steps", str(args.steps), "--width", str(args.size),
                "--height", str(args.size), "--guidance", "7.5", "--json"]
    rows = {"edge-sdk int8, fast": ours(int8, "fast"),
            "edge-sdk int8, balanced": ours(int8, "balanced"),
            "edge-sdk int8, low": ours(int8, "low"),
            "edge-sdk fp32, balanced": ours(fp32, "balanced"),
            "diffusers torch fp32 (slicing + VAE tiling)": me + ["--child", "diffusers",
                                                                 "--path", str(ckpt)],
            "onnxruntime fp32, default options (UNet only)": me + ["--child", "ort", "--path",
                                                                   str(fp32 / "unet.onnx")]}
    wanted = set(args.only.split(";")) if args.only else None
    results = {}
    for name, cmd in rows.items():
        if wanted and not any(w in name for w in wanted):
            continue
        r = _run(cmd)
        steps = sorted(r.get("unet_step_s", []))
        results[name] = {"s_per_step": steps[len(steps) // 2] if steps else None,
                         "peak_rss_mib": round(r["peak_rss_bytes"] / 2**20)
                         if "peak_rss_bytes" in r else None, "error": r.get("error")}
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    print(f"\n{args.arch} architecture (random weights), {args.size}x{args.size}, guidance 7.5, "
          f"{args.steps} steps; {platform.machine()}, {len(os.sched_getaffinity(0))}"
          f" cores, {date.today().isoformat()}\n")
    print("| engine | s / UNet step (median) | peak RSS |\n|---|---|---|")
    for name, r in results.items():
        step = f"{r['s_per_step']:.2f}" if r["s_per_step"] is not None else f"failed: {r['error']}"
        rss = f"{r['peak_rss_mib']} MiB" if r["peak_rss_mib"] else "-"
        print(f"| {name} | {step} | {rss} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r["s_per_step"] is not None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
