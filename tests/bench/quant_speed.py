"""Quantized bundles side by side: conversion time and peak RSS, UNet size, UNet latency per
step (batch 2: classifier-free guidance) and the memory a loaded UNet takes.

    python -m tests.bench.quant_speed [--work /tmp/sd15-bench] [--precisions fp32,int8,int8-static,int4]
    python -m tests.bench.quant_speed --checkpoint models/shapes/checkpoint --size 128 --runs 20
    python -m tests.bench.quant_speed --precisions fp32,w8a8,fp32+openvino

w8a8 / w8a16 are the NPU bundles (static QDQ, `--sizes SIZExSIZE`: batch 1, so a guided step
is two calls), calibrated on --calibration's prompts over --calib-steps steps; a row
`P+EP` times bundle P's UNet on execution provider EP (e.g. OpenVINO's plugin).

Without --checkpoint it builds an SD 1.5-architecture one with `edge-convert synth --arch
sd15` (random weights: size, speed and memory are those of real weights) unless it is
already in the work folder. Each conversion runs in its
own process, so its peak RSS is its own; each UNet is loaded and timed in a fresh process, so
its load RSS (and private, anonymous part) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _run(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; return (seconds, peak RSS in GB) of that process tree's largest member."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-3000:]}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def _rss_gb() -> tuple[float, float]:
    """(RSS, private anonymous) of this process, GB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(val.split()[0]) / 1e6
    return fields["VmRSS"], fields["RssAnon"]


def unet_latency(bundle: Path, runs: int, size: int, provider: str | None = None
                 ) -> dict[str, float]:
    from edge_sdk import Manifest
    from edge_sdk.backends import BackendOptions
    from edge_sdk.backends.onnx import OnnxSession
    m = Manifest.load(bundle)
    before = _rss_gb()
    spec = m.components["unet"]
    t0 = time.perf_counter()
    session = OnnxSession(bundle / spec.path, spec, BackendOptions(
        providers=(provider,) if provider else None))
    load_s = time.perf_counter() - t0
    loaded = _rss_gb()
    rng = np.random.default_rng(0)
    h = size // m.vae.scale_factor
    ctx = (2, m.tokenizer.max_length, m.unet.cross_attention_dim)
    feeds = {"sample": rng.standard_normal((2, m.unet.in_channels, h, h)).astype(np.float32),
             "timestep": np.array([999.0, 999.0], np.float32),
             "encoder_hidden_states": rng.standard_normal(ctx).astype(np.float32)}
    session.run(feeds)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - t0)
    peak = _rss_gb()
    del session
    return {"median_s": statistics.median(times), "load_s": load_s,
            "load_rss_gb": loaded[0] - before[0],
            "load_private_gb": loaded[1] - before[1], "rss_after_runs_gb": peak[0]}


def _convert_all(args: argparse.Namespace, exe: list[str], ckpt: Path, work: Path,
                 earlier: dict) -> dict[str, dict]:
    """Each row's bundle converted (in its own process) unless the work folder has it."""
    rows: dict[str, dict] = {}
    for p in args.precisions.split(","):
        out = work / f"bundle-{p.split('+')[0]}"
        if not (out / "manifest.json").exists():
            method = ["--int8-method", "static"] if p == "int8-static" else []
            if p in ("w8a8", "w8a16"):
                method = ["--sizes", f"{args.size}x{args.size}", "--default-steps",
                          str(args.calib_steps)] + (
                    ["--calibration", args.calibration] if args.calibration else [])
            secs, rss = _run(exe + [str(ckpt), "-o", str(out), "--precision",
                                    p.split("+")[0].split("-")[0],
                                    "--no-vae-encoder", *method])
            rows[p] = {"convert_s": secs, "convert_peak_rss_gb": rss}
        else:
            rows[p] = {k: v for k, v in earlier.get(p, {}).items() if k.startswith("convert")}
        unet = json.loads((out / "manifest.json").read_text())["components"]["unet"]
        rows[p]["unet_bytes"] = sum(f["size"] for f in unet["files"])
        print(p, rows[p], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/sd15-bench")
    ap.add_argument("--checkpoint", default=None, help="default: a synthesized SD 1.5")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--calibration", default=None, help="w8a8/w8a16: prompts file")
    ap.add_argument("--calib-steps", type=int, default=4, help="w8a8/w8a16: steps per prompt")
    ap.add_argument("--latency-of", default=None, help=argparse.SUPPRESS)  # the child's job
    ap.add_argument("--provider", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.latency_of:
        print(json.dumps(unet_latency(Path(args.latency_of), args.runs, args.size,
                                      args.provider)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else work / "sd15"
    exe = [sys.executable, "-m", "converters.cli"]
    if not (ckpt / "model_index.json").exists():
        print(f"synth sd15 -> {ckpt}: {_run(exe + ['synth', '--arch', 'sd15', '-o', str(ckpt)])[0]:.0f} s")
    report = work / "report.json"
    # conversion figures of bundles already in the work folder come from the earlier report
    earlier = json.loads(report.read_text()) if report.is_file() else {}
    rows = _convert_all(args, exe, ckpt, work, earlier)
    if not args.skip_latency:
        for p in rows:  # each in a fresh process: its load memory is its own
            bundle, _, provider = p.partition("+")
            child = subprocess.run([sys.executable, "-m", "tests.bench.quant_speed",
                                    "--latency-of", str(work / f"bundle-{bundle}"), "--runs",
                                    str(args.runs), "--size", str(args.size)]
                                   + (["--provider", provider] if provider else []),
                                   capture_output=True, text=True, check=True)
            rows[p].update(json.loads(child.stdout.strip().splitlines()[-1]))
            print(p, rows[p], flush=True)
    ref = rows.get("fp32", {}).get("unet_bytes")
    print(f"\n{ckpt.name}: UNet at {args.size}x{args.size}, batch 2, "
          f"median of {args.runs} (one run, side by side)")
    print(f"{'precision':<14}{'UNet MB':>9}{'x fp32':>8}{'convert s':>11}{'peak RSS GB':>13}"
          f"{'s/step':>8}{'x fp32':>8}{'load s':>8}{'load RSS GB':>13}{'private GB':>12}")
    t_ref = rows.get("fp32", {}).get("median_s")
    for p, r in rows.items():
        ratio = r["unet_bytes"] / ref if ref else float("nan")
        speed = r.get("median_s", float("nan"))
        print(f"{p:<14}{r['unet_bytes'] / 1e6:>9.0f}{ratio:>8.3f}"
              f"{r.get('convert_s', float('nan')):>11.0f}"
              f"{r.get('convert_peak_rss_gb', float('nan')):>13.2f}{speed:>8.2f}"
              f"{speed / t_ref if t_ref else float('nan'):>8.2f}"
              f"{r.get('load_s', float('nan')):>8.1f}"
              f"{r.get('load_rss_gb', float('nan')):>13.2f}"
              f"{r.get('load_private_gb', float('nan')):>12.2f}")
    report.write_text(json.dumps({**earlier, **rows}, indent=2))


if __name__ == "__main__":
    main()
