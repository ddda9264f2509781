"""Low-memory generation on a Raspberry Pi (or any small board): 512x512, tiled VAE decoding,
the memory plan printed, per-stage times and peak memory reported.

    python examples/raspberry_pi.py "a lighthouse at dusk" --model sd15-int8 -o out.png
    python examples/raspberry_pi.py --memory 300MB          # plan for a budget instead

Convert the bundle on a workstation (the decoder's stages, which let the VAE be decoded in
tiles, are exported by default; examples/convert_and_deploy.sh shows the whole trip):

    edge-convert stable-diffusion-v1-5 -o sd15-int8 --precision int8

Without --model it uses the shipped default model, which was trained at 128x128: at 512x512
it draws repeated shapes, but the memory behaviour is the real thing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edge_sdk import GenerationConfig, Pipeline
from edge_sdk.bench import run_bench
from edge_sdk.errors import EdgeSDKError
from edge_sdk.image import save_png


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("prompt", nargs="?", default="a red circle on a blue background")
    ap.add_argument("--model", default=None, help="bundle folder (default: the shipped model)")
    ap.add_argument("--memory", default="low", help="low | balanced | fast | e.g. 300MB")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="default: all cores")
    ap.add_argument("-o", "--output", default="pi.png")
    args = ap.parse_args()
    # warnings only: the memory plan is in the report's table, printed once below
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    config = GenerationConfig(steps=args.steps, seed=args.seed, width=args.size,
                              height=args.size)
    try:
        report, result = run_bench(args.prompt, config, lambda: Pipeline.load(
            args.model, memory=args.memory, threads=args.threads))
    except EdgeSDKError as exc:  # a typed error names the problem and the fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    save_png(result.images[0], args.output, result.parameters)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
