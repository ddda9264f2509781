"""Measured peak RSS vs edge_sdk.estimate for each memory mode and size, and the mode a budget
chooses for each size against the one the measurements say it should.

    python -m tests.bench.memory_plan [--model BUNDLE] [--sizes 256,512,1024]
        [--budgets 100MB,300MB,1GB] [--steps 2]

Each generation runs in its own process (`edge-sdk bench --json`), so each peak (VmHWM) is
that generation's alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from edge_sdk import GenerationConfig, Manifest
from edge_sdk.errors import InvalidInputError
from edge_sdk.estimate import estimate_peak_bytes
from edge_sdk.memory import MODES, parse_bytes, plan_memory
from edge_sdk.models import default_bundle

MIB = 2**20


def measure(model: str, mode: str, size: int, steps: int) -> float:
    cmd = [sys.executable, "-m", "edge_sdk.cli", "bench", "--model", model, "--memory", mode,
           "--width", str(size), "--height", str(size), "--steps", str(steps), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["peak_rss_bytes"] / MIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_bundle()))
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--budgets", default="100MB,300MB,1GB")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    m = Manifest.load(args.model)
    sizes = [int(s) for s in args.sizes.split(",")]
    measured: dict[tuple[int, str], float] = {}
    print(f"{'size':>6} {'mode':>9} {'measured MiB':>13} {'estimate MiB':>13} {'ratio':>6}")
    for size in sizes:
        cfg = GenerationConfig(seed=0, width=size, height=size).resolve(m)
        for mode in MODES:
            measured[size, mode] = got = measure(args.model, mode, size, args.steps)
            est = estimate_peak_bytes(m, cfg, mode) / MIB
            print(f"{size:>6} {mode:>9} {got:>13.0f} {est:>13.0f} {est / got:>6.2f}")
    print(f"\n{'budget':>8} {'size':>6} {'chosen':>9} {'should be':>10}")
    for budget in args.budgets.split(","):
        for size in sizes:
            cfg = GenerationConfig(seed=0, width=size, height=size).resolve(m)
            try:
                chosen = plan_memory(budget, m, cfg).mode
            except InvalidInputError:
                chosen = "refused"
            fits = [md for md in MODES if measured[size, md] * MIB <= parse_bytes(budget)]
            should = fits[0] if fits else "refused"
            print(f"{budget:>8} {size:>6} {chosen:>9} {should:>10}"
                  + ("" if chosen == should else "   <- differs"))


if __name__ == "__main__":
    main()
