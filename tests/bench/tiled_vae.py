"""Tiled vs untiled VAE decoding of the default model's latents at 512x512 (64x64 latents).

    python -m tests.bench.tiled_vae [--model BUNDLE] [--tiles 16,32]

Makes 512x512 latents with the model (fixed seed), then decodes them in a fresh process per
variant (untiled, and each tile size) so that each peak is its own, and prints PSNR against
the untiled image, the VAE stage's peak private (anonymous) memory — absolute, and above
what the process held before decoding — and the decode time. Both in memory="low" (no
arena; the decoder opened for the decode only), so that tiling is the only difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "three small blue stars at the top on a yellow background"


def child(model: str | None, latents: Path, tile: int, out: Path) -> None:
    from edge_sdk import Pipeline
    from edge_sdk.bench import _PeakSampler, process_memory
    # low: no onnxruntime arena (an arena keeps its high-water mark for the session's life)
    # and each decoder graph opened for its stage only; tile 0 = decode untiled
    pipe = Pipeline.load(model, memory="low")
    z = np.load(latents)
    before = process_memory()["RssAnon"]
    with _PeakSampler(interval=0.001) as peak:
        t0 = time.perf_counter()
        img = pipe.decode_latents(z, tile=tile)
        seconds = time.perf_counter() - t0
    np.save(out, img)
    print(json.dumps({"peak_private": peak.peak, "before": before, "seconds": seconds}))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tiles", default="16,32")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, Path(args.child[0]), int(args.child[1]), Path(args.child[2]))
        return 0
    from edge_sdk import GenerationConfig, Pipeline
    with tempfile.TemporaryDirectory() as tmp:
        lat = Path(tmp) / "latents.npy"
        pipe = Pipeline.load(args.model)
        gen = pipe.generate(PROMPT, GenerationConfig(seed=0, width=512, height=512))
        np.save(lat, gen.latents)
        del pipe
        rows = {}
        for tile in [0] + [int(t) for t in args.tiles.split(",")]:
            out = Path(tmp) / f"img{tile}.npy"
            cmd = [sys.executable, "-m", "tests.bench.tiled_vae", "--child", str(lat),
                   str(tile), str(out)] + (["--model", args.model] if args.model else [])
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True,
                                          check=True).stdout)
            r["image"] = np.load(out)
            rows[tile] = r
    ref = rows[0]["image"]
    mib = 2**20
    print(f"VAE decoding of 64x64 latents (512x512 output), {PROMPT!r}, seed 0\n")
    print("| decoding | PSNR vs untiled | max abs diff (/255) | peak private | above "
          "baseline | seconds |\n|---|---|---|---|---|---|")
    for tile, r in rows.items():
        name = "untiled" if tile == 0 else f"tiles of {tile} latents ({tile * 8} px)"
        p = "—" if tile == 0 else f"{psnr(r['image'], ref):.1f} dB"
        diff = float(np.abs(r["image"] - ref).max()) * 255
        print(f"| {name} | {p} | {diff:.2f} | {r['peak_private'] / mib:.0f} MiB | "
              f"{(r['peak_private'] - r['before']) / mib:.0f} MiB | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
