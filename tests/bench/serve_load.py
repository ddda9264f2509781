"""`edge-sdk serve` under load: concurrent clients on 127.0.0.1, the default model, small
sizes.

    python -m tests.bench.serve_load [--clients 16] [--requests 25] [--size 64] [--api a1111]

Each client sends its requests one after another (a 429 is an answer: it moves on to the
next). Every answer must be 200 or 429 (any other status, or a 5xx, fails the run); every
served image must equal the Pipeline's for its seed (seeds cycle over a few, whose images
are made first in this process); the server's RSS after the run must be within 5 % of its
RSS after the first 10 served requests. Prints requests/s (served, and answered), p50/p95
latency of served and of refused requests, and the two RSS figures. Exit 1 on any miss.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edge_sdk import Pipeline
from tests.serve_helpers import LiveServer, decode

PROMPTS = ["a red circle on a blue background", "two green squares", "a yellow triangle",
           "three blue circles on a white background"]
RSS_TOLERANCE = 0.05


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def request_body(api: str, k: int, size: int, steps: int) -> tuple[str, dict]:
    prompt, seed = PROMPTS[k % len(PROMPTS)], k % len(PROMPTS)
    if api == "openai":
        return "/v1/images/generations", {"prompt": prompt, "size": f"{size}x{size}",
                                          "seed": seed, "steps": steps}
    return "/sdapi/v1/txt2img", {"prompt": prompt, "seed": seed, "steps": steps,
                                 "width": size, "height": size}


def image_of(api: str, body: dict) -> np.ndarray:
    return decode(body["data"][0]["b64_json"] if api == "openai" else body["images"][0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=25)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--api", choices=["a1111", "openai"], default="a1111")
    args = ap.parse_args()
    pipe = Pipeline.load()
    want = [np.asarray(pipe(p, seed=k, steps=args.steps, width=args.size, height=args.size))
            for k, p in enumerate(PROMPTS)]
    del pipe
    log = Path(tempfile.mkdtemp()) / "server.log"
    server = LiveServer([], log)
    results: list[tuple[int, float, bool]] = []  # status, seconds, image correct
    lock = threading.Lock()
    first_rss: list[float] = []

    def client(c: int) -> None:
        for r in range(args.requests):
            k = c * args.requests + r
            path, body = request_body(args.api, k, args.size, args.steps)
            t0 = time.perf_counter()
            status, _, out = server.request("POST", path, body, timeout=600)
            dt = time.perf_counter() - t0
            ok = status == 200 and np.array_equal(image_of(args.api, out),
                                                  want[k % len(PROMPTS)])
            with lock:
                results.append((status, dt, ok))
                if not first_rss and sum(s == 200 for s, _, _ in results) >= 10:
                    first_rss.append(rss_mib(server.proc.pid))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    end_rss = rss_mib(server.proc.pid)
    server.stop()
    return report(results, wall, first_rss[0] if first_rss else float("nan"), end_rss, args)


def report(results: list[tuple[int, float, bool]], wall: float, first: float, end: float,
           args: argparse.Namespace) -> int:
    served = [dt for s, dt, _ in results if s == 200]
    refused = [dt for s, dt, _ in results if s == 429]
    other = sorted({s for s, _, _ in results if s not in (200, 429)})
    wrong = sum(1 for s, _, ok in results if s == 200 and not ok)

    def pct(xs: list[float], q: float) -> str:
        return f"{np.percentile(xs, q) * 1000:.0f} ms" if xs else "-"
    print(f"{args.clients} clients x {args.requests} requests, {args.api} API, "
          f"{args.size}x{args.size}, {args.steps} steps, default model: {wall:.1f} s")
    print(f"served {len(served)} ({len(served) / wall:.2f}/s), 429 {len(refused)}, "
          f"other {other or 'none'}; answered {len(results) / wall:.1f}/s")
    print(f"latency served p50 {pct(served, 50)} p95 {pct(served, 95)}; "
          f"429 p50 {pct(refused, 50)} p95 {pct(refused, 95)}")
    if served:
        print(f"mean served {statistics.mean(served) * 1000:.0f} ms")
    drift = (end - first) / first
    print(f"server RSS after 10 served {first:.1f} MiB, after the run {end:.1f} MiB "
          f"({drift * 100:+.1f} %)")
    print(f"served images equal to the Pipeline's: {len(served) - wrong}/{len(served)}")
    ok = not other and not wrong and abs(drift) <= RSS_TOLERANCE and \
        len(results) == args.clients * args.requests
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
