"""What a load-time LoRA costs in memory: an SD 1.5-architecture fp16 bundle loaded in
`memory="balanced"` without and with a LoRA, each in a fresh process, private memory
(RssAnon) after load and after one small generation, against the bytes of the tensors the
LoRA changes.

    python -m tests.bench.lora_memory [--checkpoint DIR] [--bundle DIR] [--rank 8]

The checkpoint (random SD 1.5 weights: `edge-convert synth --arch sd15`) is converted to
fp16 when the bundle folder does not exist. The LoRA is kohya-style, rank `--rank`, on every
attention projection of the UNet (q, k, v, out of attn1 and attn2) and of the text encoder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from edge_sdk import Pipeline
from edge_sdk.osmem import own_private_bytes
bundle, lora = sys.argv[1], sys.argv[2]
pipe = Pipeline.load(bundle, memory="balanced", loras={lora: 0.8} if lora else None)
after_load = own_private_bytes()
pipe("a lighthouse", steps=1, width=256, height=256, seed=0)
arrays = {id(a): a for w in pipe.components._weights.values() for a in w.values()}
changed = sum(a.nbytes for a in arrays.values())  # (the shallow branch shares the UNet's)
print(json.dumps({"load": after_load, "generate": own_private_bytes(), "changed": changed}))
"""


def measure(bundle: Path, lora: Path | None) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(lora or "")],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/tmp/edge-sdk-few-step/sd15"))
    ap.add_argument("--bundle", type=Path, default=Path("/tmp/edge-sdk-lora/sd15-fp16"))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2, help="processes per case (median)")
    args = ap.parse_args()
    if not args.bundle.exists():
        from converters.convert import convert
        convert(args.checkpoint, args.bundle, precision="fp16", vae_encoder=False,
                vae_stages=False, feature_cache=True)
    from tests.lora_files import write_lora
    lora = write_lora(args.checkpoint, args.bundle.parent / "lora-rank.safetensors", "kohya",
                      text=True, rank=args.rank, strength=0.05)
    rows = {name: [measure(args.bundle, path) for _ in range(args.runs)]
            for name, path in (("without", None), ("with LoRA", lora))}
    med = {name: {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
           for name, runs in rows.items()}
    changed = med["with LoRA"]["changed"]
    print(f"LoRA rank {args.rank}: {changed / 2**20:.1f} MiB of weights changed (fp16)")
    for stage in ("load", "generate"):
        a, b = med["without"][stage], med["with LoRA"][stage]
        print(f"private after {stage:8s}: without {a / 2**20:8.1f} MiB, with {b / 2**20:8.1f} "
              f"MiB, growth {(b - a) / 2**20:7.1f} MiB = {(b - a) / changed:.2f}x the "
              "changed bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
