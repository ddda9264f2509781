"""One generation inside a hard memory cap (a cgroup-v1 memory limit; needs root, Linux).

    python -m tests.bench.memory_cap BUNDLE [--cap 300MB] [--memory low] [--steps 2]
        [--size 512] [--img2img STRENGTH] [--output capped.png] [--json]

Runs `edge-sdk bench` in a child process that is inside a fresh memory cgroup from its
first instruction (the limit covers everything it charges: private memory and the page
cache its mapped weights are read into, which the kernel must evict to stay under). Prints
the cap, the cgroup's peak usage, whether the kernel killed anything, seconds per UNet step
and where the image went. Exits 0 only when the generation completed inside the cap and
wrote an image.
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

from edge_sdk.memory import parse_bytes

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


class MemoryCgroup:
    """A cgroup-v1 memory cgroup with a hard limit (swap included when the kernel has
    memsw accounting), removed on exit."""

    def __init__(self, limit: int) -> None:
        if not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
            raise SystemExit(f"{CGROUP_ROOT} is not a cgroup-v1 memory hierarchy; this "
                             "script needs one (and root)")
        self.path = CGROUP_ROOT / f"edge-sdk-cap-{os.getpid()}"
        self.limit = limit

    def __enter__(self) -> "MemoryCgroup":
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(self.limit))
        return self

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stat(self) -> dict[str, int]:
        return {k: int(v) for k, v in (ln.split() for ln in self.read("memory.stat")
                                       .splitlines())}

    def oom_kills(self) -> int:
        for line in self.read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def join(self) -> None:
        """Run in the child between fork and exec: the child is inside before it starts."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def __exit__(self, *exc: object) -> None:
        for _ in range(50):  # the child's pages may take a moment to uncharge
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def evict_from_page_cache(folder: Path) -> int:
    """Drop `folder`'s files from the page cache (bytes advised), so that the capped run
    reads its weights afresh and they are charged to its cgroup: pages cached earlier stay
    charged to whoever read them first and would slip past the cap."""
    total = 0
    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += f.stat().st_size
            finally:
                os.close(fd)
    return total


def _source_image(out: Path, size: int) -> Path:
    """A rendered shapes scene at size x size, next to the output."""
    from PIL import Image

    from edge_sdk.shapes.scenes import Scene, render
    path = out.with_name(out.stem + "-source.png")
    scene = Scene("star", "orange", 2, "small", "center", "blue")
    Image.fromarray(render(scene, size=size)).save(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--cap", default="300MB")
    ap.add_argument("--memory", default="low", help="the pipeline's memory mode or budget")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--img2img", type=float, default=None, metavar="STRENGTH",
                    help="img2img from a rendered size x size scene at this strength (the "
                    "bundle needs its VAE encoder); --steps are then the scheduler's, "
                    "int(steps x strength) of them run")
    ap.add_argument("--control", action="store_true",
                    help="steer the bundle's ControlNet with a rendered scene's Canny edges")
    ap.add_argument("--output", default="capped.png")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cap = parse_bytes(args.cap)
    out = Path(args.output)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "edge_sdk.cli", "bench", "--model", args.bundle,
           "--memory", args.memory, "--steps", str(args.steps), "--width", str(args.size),
           "--height", str(args.size), "--guidance", str(args.guidance), "--json",
           "--output", str(out)] + (["--threads", str(args.threads)] if args.threads else [])
    if args.img2img is not None:
        cmd += ["--image", str(_source_image(out, args.size)), "--strength", str(args.img2img)]
    if args.control:
        cmd += ["--control-image", str(_source_image(out, args.size)),
                "--control-preprocess", "canny"]
    evict_from_page_cache(Path(args.bundle))
    with MemoryCgroup(cap) as cg:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cg.join)
        wall = time.perf_counter() - t0
        peak, failcnt, kills = int(cg.read("memory.max_usage_in_bytes")), \
            int(cg.read("memory.failcnt")), cg.oom_kills()
    ok = proc.returncode == 0 and out.exists() and kills == 0
    bench = json.loads(proc.stdout) if proc.returncode == 0 else None
    steps = bench["unet_step_s"] if bench else []
    median = statistics.median(steps) if steps else None
    result = {"bundle": args.bundle, "cap_bytes": cap, "cgroup_peak_bytes": peak,
              "limit_hits": failcnt, "oom_kills": kills, "returncode": proc.returncode,
              "wall_s": round(wall, 1), "completed": ok,
              "unet_step_s_median": median,
              "decode_over_unet_step": bench["vae_decoder_s"] / median if median else None,
              "encode_over_unet_step": bench["vae_encoder_s"] / median
              if median and bench and bench.get("vae_encoder_s") else None,
              "image": str(out) if out.exists() else None, "bench": bench}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _report(args, result, proc.stderr)
    return 0 if ok else 1


def _report(args: argparse.Namespace, result: dict, stderr: str) -> None:
    """The human-readable lines of a run."""
    mib, bench, cap = 2**20, result["bench"], result["cap_bytes"]
    peak, failcnt, kills = result["cgroup_peak_bytes"], result["limit_hits"], result["oom_kills"]
    wall, ok = result["wall_s"], result["completed"]
    what = f"img2img strength {args.img2img}, " if args.img2img is not None else ""
    print(f"cap {cap / mib:.0f} MiB, memory={args.memory}, {args.size}x{args.size}, "
          f"{what}{args.steps} steps, guidance {args.guidance}")
    print(f"cgroup peak {peak / mib:.0f} MiB (page cache included), limit reached "
          f"{failcnt} times (pages evicted), OOM kills {kills}, exit {result['returncode']}")
    if bench:
        print(f"UNet step median {result['unet_step_s_median']:.2f} s, text encoder "
              f"{bench['text_encoder_s']:.1f} s, VAE {bench['vae_decoder_s']:.1f} s "
              f"({result['decode_over_unet_step']:.2f}x a UNet step), "
              f"process peak RSS {bench['peak_rss_bytes'] / mib:.0f} MiB, peak private "
              f"{bench['peak_private_bytes'] / mib:.0f} MiB, wall {wall:.0f} s")
        stages = bench["stage_peak_private_bytes"]
        if bench.get("vae_encoder_s") is not None:
            print(f"VAE encoder {bench['vae_encoder_s']:.1f} s "
                  f"({result['encode_over_unet_step']:.2f}x a UNet step)")
        print("peak private by stage: " + ", ".join(f"{k} {v / mib:.0f} MiB"
                                                    for k, v in stages.items()))
    print(f"image: {result['image']}" if ok else
          f"FAILED inside the cap:\n{stderr[-2000:]}")


if __name__ == "__main__":
    sys.exit(main())
