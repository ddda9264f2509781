"""SDXL-Turbo on this machine: the full SDXL architecture (random weights), 512x512, 1 step,
guidance 0, as the model is used.

    python -m tests.bench.sdxl_turbo [--work /tmp/edge-sdk-sdxl] [--only ROWS] [--json F]
        [--caps 1GiB,600MiB]

Builds what is missing under --work (the checkpoint with `edge-convert synth --arch
sdxl-turbo`, stored fp16 as SDXL is published; the int8 and int4 bundles with edge-convert,
and an int8 bundle from the same model written out as one original-layout file; each
conversion's wall time and peak RSS measured as a child process), then runs each
engine in a process of its own so that its peak RSS (VmHWM) is its own:

- edge-sdk: `edge-sdk bench --memory fast|balanced|low` on the int8 bundle (int8 UNet and
  text encoders, fp32 VAE); s/image is the generation after load (text encoders, the UNet
  step, the VAE decode);
- diffusers: StableDiffusionXLPipeline in torch fp32 with its defaults (SDPA attention, no
  slicing or tiling), the same prompt, size, step and guidance;
- `low` inside a cgroup-v1 memory cap (tests.bench.memory_cap), for each of --caps.

Prints a table (and --json). Speed and memory are those of real SDXL-Turbo weights.
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

import numpy as np

PROMPT = "a cinematic photo of a lighthouse on a cliff at sunset"
SIZE, STEPS, GUIDANCE = 512, 1, 0.0
MIB = 2**20


def _peak_rss() -> int:
    from edge_sdk.bench import process_memory
    return process_memory().get("VmHWM", 0)


def child_diffusers(ckpt: Path) -> dict[str, Any]:
    """diffusers fp32, its defaults, one generation after load."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    pipe = StableDiffusionXLPipeline.from_pretrained(ckpt, local_files_only=True,
                                                     torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    t1 = time.perf_counter()
    with torch.no_grad():
        pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=SIZE,
             width=SIZE, generator=torch.Generator().manual_seed(0))
    return {"load_s": t1 - t0, "image_s": time.perf_counter() - t1,
            "peak_rss_bytes": _peak_rss()}


def convert_measured(ckpt: Path, out: Path, precision: str, *extra: str) -> dict[str, Any]:
    """`edge-convert` in a child process: its wall time and its own peak RSS (ru_maxrss of
    that child, from wait4)."""
    if (out / "manifest.json").exists():
        return {"skipped": "exists"}
    cmd = [sys.executable, "-m", "converters.cli", str(ckpt), "-o", str(out), "--precision",
           precision, "--overwrite", *extra]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode})")
    return {"wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_kib": usage.ru_maxrss}  # Linux: KiB


def prepare(work: Path) -> tuple[Path, dict[str, Path], dict[str, Any]]:
    from converters.synth import build_checkpoint
    ckpt = work / "ckpt"
    if not (ckpt / "model_index.json").exists():
        build_checkpoint(ckpt, "sdxl-turbo", seed=0)
    bundles = {p: work / p for p in ("int8", "int4")}
    conversions = {p: convert_measured(ckpt, out, p) for p, out in bundles.items()}
    # the same model as one original-layout file (fp16, as SDXL files are published),
    # converted with its family given: the single-file path's memory
    single = work / "sdxl-turbo.safetensors"
    if not single.exists():
        from tests.single_files import write_single_file
        write_single_file(ckpt, single, "sdxl", dtype=np.float16)
    conversions["int8, single file"] = convert_measured(single, work / "single-int8", "int8",
                                                        "--family", "sdxl-turbo")
    return ckpt, bundles, conversions


def sizes(ckpt: Path, bundles: dict[str, Path]) -> dict[str, Any]:
    """The UNet's bytes: fp32 (its parameters x 4, what the fp32 graph's weights hold) and
    in each bundle."""
    from edge_sdk.manifest import Manifest
    from edge_sdk.safetensors_file import read_header
    params = 0
    for f in (ckpt / "unet").glob("*.safetensors"):
        for name, info in read_header(f)[0].items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                params += n
    out: dict[str, Any] = {"unet_params": params, "fp32_bytes": params * 4}
    for p, b in bundles.items():
        got = Manifest.load(b).components["unet"].bytes
        out[p] = {"bytes": got, "ratio": round(got / (params * 4), 3)}
    return out


def _run(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout)


def rows(ckpt: Path, int8: Path, caps: list[str]) -> dict[str, list[str]]:
    def ours(mode: str) -> list[str]:
        return [sys.executable, "-m", "edge_sdk.cli", "bench", PROMPT, "--model", str(int8),
                "--memory", mode, "--steps", str(STEPS), "--width", str(SIZE), "--height",
                str(SIZE), "--guidance", str(GUIDANCE), "--json"]
    out = {f"edge-sdk int8, {m}": ours(m) for m in ("fast", "balanced", "low")}
    out["diffusers torch fp32 (defaults: SDPA attention)"] = [
        sys.executable, "-m", "tests.bench.sdxl_turbo", "--child", str(ckpt)]
    for cap in caps:
        out[f"edge-sdk int8, low, cgroup cap {cap}"] = [
            sys.executable, "-m", "tests.bench.memory_cap", str(int8), "--cap", cap,
            "--memory", "low", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
            "--size", str(SIZE), "--output", str(int8.parent / f"capped-{cap}.png"), "--json"]
    return out


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """s/image, load and peak RSS of a row's result (edge-sdk bench, memory_cap or the
    diffusers child)."""
    if "error" in r:
        return {"error": r["error"]}
    if "cap_bytes" in r:  # memory_cap
        b = r.get("bench") or {}
        return {"completed": r["completed"], "image_s": b.get("total_s"),
                "load_s": b.get("load_s"), "peak_rss_mib": round(b.get("peak_rss_bytes", 0)
                                                                 / MIB),
                "cgroup_peak_mib": round(r["cgroup_peak_bytes"] / MIB),
                "limit_hits": r["limit_hits"], "oom_kills": r["oom_kills"]}
    out = {"image_s": r.get("total_s", r.get("image_s")), "load_s": r.get("load_s"),
           "peak_rss_mib": round(r["peak_rss_bytes"] / MIB)}
    if "peak_private_bytes" in r:  # edge-sdk bench: what is not mapped from the bundle
        out["peak_private_mib"] = round(r["peak_private_bytes"] / MIB)
    return out


def _table(results: dict[str, Any]) -> None:
    print(f"\nSDXL-Turbo architecture (random weights), {SIZE}x{SIZE}, {STEPS} step, guidance "
          f"{GUIDANCE}; {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"{date.today().isoformat()}; one run each\n")
    print("| engine | s / image (after load) | load s | peak RSS |\n|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | - | - |")
            continue
        cap = (f" (cgroup peak {r['cgroup_peak_mib']} MiB, completed {r['completed']})"
               if "cgroup_peak_mib" in r else "")
        private = f" ({r['peak_private_mib']} MiB private)" if "peak_private_mib" in r \
            else ""
        print(f"| {name} | {r['image_s']:.1f} | {r['load_s']:.1f} | "
              f"{r['peak_rss_mib']} MiB{private}{cap} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edge-sdk-sdxl")
    ap.add_argument("--only", default=None, help="';'-separated parts of row names to run")
    ap.add_argument("--caps", default="1GiB,600MiB")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_diffusers(Path(args.child))))
        return 0
    ckpt, bundles, conversions = prepare(Path(args.work))
    print(json.dumps({"conversions": conversions, "unet": sizes(ckpt, bundles)}, indent=1))
    wanted = set(args.only.split(";")) if args.only else None
    results = {}
    for name, cmd in rows(ckpt, bundles["int8"], [c for c in args.caps.split(",") if c]).items():
        if wanted and not any(w in name for w in wanted):
            continue
        results[name] = summary(_run(cmd))
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    _table(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"conversions": conversions,
                                               "unet": sizes(ckpt, bundles),
                                               "rows": results}, indent=1))
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
