"""SD 1.5 with one ControlNet on this machine: the full architectures (random weights), int8,
512x512, each run beside the same generation without control.

    python -m tests.bench.controlnet [--work /tmp/edge-sdk-controlnet] [--steps 4]
        [--caps 400MiB] [--json F]

Builds what is missing under --work: the SD 1.5 checkpoint (`edge-convert synth --arch
sd15`), a ControlNet for it (`edge-convert synth --controlnet-for`: ControlNetModel.from_unet,
the zero convolutions drawn at random so that it steers), and the int8 bundle with the
ControlNet, and the plain int8 bundle (edge-convert in child processes: wall time and peak
RSS). Then, each in a process of its own (`edge-sdk bench --json`: peak RSS is that
process's VmHWM, s/step the median UNet step, which with control includes the ControlNet's
pass):

- balanced and fast: the plain bundle's text-to-image, and the ControlNet bundle with a
  Canny control map of a rendered scene (and, balanced, without one: zero residuals);
- low with the control inside a cgroup-v1 memory cap (tests.bench.memory_cap), each of
  --caps.

Guidance 7.5 (both branches), the default scheduler. Speed and memory are those of real
weights; the images are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

from .sdxl_turbo import convert_measured

PROMPT = "a photo of a red house by a lake"
SIZE, GUIDANCE = 512, 7.5
MIB = 2**20


def prepare(work: Path) -> tuple[Path, Path, dict[str, Any]]:
    from converters.synth import build_checkpoint, build_controlnet
    ckpt, net = work / "sd15", work / "controlnet"
    if not (ckpt / "model_index.json").exists():
        build_checkpoint(ckpt, "sd15", seed=0)
    if not (net / "config.json").exists():
        build_controlnet(net, ckpt, seed=1)
    bundle, plain = work / "int8-controlnet", work / "int8"
    conversion = {"with ControlNet": convert_measured(ckpt, bundle, "int8", "--controlnet",
                                                      str(net)),
                  "plain": convert_measured(ckpt, plain, "int8")}
    return bundle, plain, conversion


def _scene(work: Path) -> Path:
    """A rendered shapes scene at 512 px: what the Canny preprocessor reads."""
    from PIL import Image

    from edge_sdk.shapes.scenes import Scene, render
    path = work / "scene.png"
    Image.fromarray(render(Scene("star", "orange", 2, "small", "center", "blue"),
                           size=SIZE)).save(path)
    return path


def rows(bundle: Path, plain: Path, work: Path, steps: int, caps: list[str]
         ) -> dict[str, list[str]]:
    control = ["--control-image", str(_scene(work)), "--control-preprocess", "canny"]

    def bench(mode: str, model: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "edge_sdk.cli", "bench", PROMPT, "--model", str(model),
                "--memory", mode, "--steps", str(steps), "--width", str(SIZE), "--height",
                str(SIZE), "--guidance", str(GUIDANCE), "--json", *extra]
    out = {}
    for mode in ("balanced", "fast"):
        out[f"{mode}, plain bundle, text-to-image"] = bench(mode, plain)
        out[f"{mode}, ControlNet bundle, with control"] = bench(mode, bundle, *control)
        if mode == "balanced":
            out[f"{mode}, ControlNet bundle, no control"] = bench(mode, bundle)
    for cap in caps:
        out[f"low, with ControlNet, cgroup cap {cap}"] = [
            sys.executable, "-m", "tests.bench.memory_cap", str(bundle), "--cap", cap,
            "--memory", "low", "--steps", str(steps), "--guidance", str(GUIDANCE),
            "--size", str(SIZE), "--control", "--output", str(work / f"capped-{cap}.png"),
            "--json"]
    return out


def summary(r: dict[str, Any]) -> dict[str, Any]:
    if "cap_bytes" in r:
        b = r.get("bench") or {}
        return {"completed": r["completed"], "step_s": r["unet_step_s_median"],
                "peak_rss_mib": round(b.get("peak_rss_bytes", 0) / MIB),
                "cgroup_peak_mib": round(r["cgroup_peak_bytes"] / MIB),
                "limit_hits": r["limit_hits"], "oom_kills": r["oom_kills"],
                "total_s": b.get("total_s")}
    return {"step_s": statistics.median(r["unet_step_s"]), "total_s": r["total_s"],
            "peak_rss_mib": round(r["peak_rss_bytes"] / MIB),
            "peak_private_mib": round(r["peak_private_bytes"] / MIB)}


def _run(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return summary(json.loads(proc.stdout))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edge-sdk-controlnet")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--caps", default="400MiB")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bundle, plain, conversion = prepare(work)
    print(json.dumps({"conversion": conversion}), flush=True)
    results = {}
    for name, cmd in rows(bundle, plain, work, args.steps,
                          [c for c in args.caps.split(",") if c]).items():
        results[name] = _run(cmd)
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    print(f"\nSD 1.5 + one ControlNet (random weights), int8, {SIZE}x{SIZE}, {args.steps} "
          f"steps, guidance {GUIDANCE}; {platform.machine()}, {len(os.sched_getaffinity(0))} "
          f"cores, {date.today().isoformat()}; one run each\n")
    print("| run | s / step (median) | peak RSS | peak private |\n|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | - | - |")
            continue
        cap = f" (cgroup peak {r['cgroup_peak_mib']} MiB, completed {r['completed']})" \
            if "cgroup_peak_mib" in r else ""
        private = f"{r['peak_private_mib']} MiB" if "peak_private_mib" in r else "-"
        print(f"| {name} | {r['step_s']:.2f} | {r['peak_rss_mib']} MiB{cap} | {private} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"conversion": conversion, "rows": results},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
