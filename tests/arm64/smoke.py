"""The emulated-aarch64 check, in one process (each start of Python with numpy and
onnxruntime costs ~10 s under emulation): one small generation per feature, each compared
with the same generation made natively (tests/arm64/reference.py), so the check is that
aarch64 computes what x86 does, not only that it runs.

    python tests/arm64/smoke.py REFERENCE.npz TFLITE_BUNDLE W8A8_BUNDLE SDXL_BUNDLE

Features: the default model on onnxruntime; the shapes evaluator (OpenCV); low memory (the
VAE decoded in strips, decoder sessions opened per stage); the tiny decoder; the live
preview's decoder (numpy); feature caching; the few-step model (shapes-lcm); a LoRA applied at
load time with a weighted prompt; img2img;
inpainting in low memory (the source encoded in strips); the LiteRT backend; the W8A8 (NPU)
bundle's QDQ UNet on the CPU EP; a tiny SDXL bundle in low memory; `edge-sdk serve`
(embedded), one image over HTTP. (The runtime's import boundary is tested natively: this root
filesystem has no torch to import.) Prints one line per feature with its time and its
difference from x86; exits 1 on any miss.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import (PROMPT, SEED, STEPS, cached, controlled, decode_tiny,  # noqa: E402
                       edit, few_step, generate, lora_file, preview, sdxl, seen, with_lora)

# onnxruntime's aarch64 kernels (NEON) round differently from x86's (AVX2): a few /255
TOLERANCE = 3
INT8_PSNR = 30.0
SMALL_TILE = 4
failures: list[str] = []


def check(feature: str, got: np.ndarray, want: np.ndarray, started: float) -> None:
    diff = int(np.abs(got.astype(int) - want.astype(int)).max())
    ok = got.shape == want.shape and diff <= TOLERANCE
    print(f"{feature:<34}{time.perf_counter() - started:7.1f} s   max diff vs x86 "
          f"{diff}/255   {'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        failures.append(feature)


def check_int8(feature: str, got: np.ndarray, want: np.ndarray, started: float) -> None:
    """Integer kernels: x86's u8s8 (AVX2 without VNNI: 16-bit intermediate sums that can
    saturate) and ARM's int8 dot products do not round alike, so a static int8 UNet is not
    held to a few /255 but to the same picture: the shapes evaluator reads the same scene,
    and PSNR >= INT8_PSNR dB (measured: max 54/255 at a few pixels, mean 1.4/255,
    37.9 dB)."""
    diff = np.abs(got.astype(float) - want.astype(float))
    psnr = 10 * np.log10(255.0 ** 2 / max(float(np.mean(diff ** 2)), 1e-12))
    same = got.shape == want.shape and seen(got) == seen(want)
    ok = same and psnr >= INT8_PSNR
    print(f"{feature:<34}{time.perf_counter() - started:7.1f} s   vs x86 mean "
          f"{diff.mean():.1f}/255, PSNR {psnr:.1f} dB, same scene: {same}   "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    if not ok:
        failures.append(feature)


def low_memory(latents: np.ndarray, want: np.ndarray) -> None:
    from edge_sdk import Pipeline
    from edge_sdk.image import to_pil
    t = time.perf_counter()
    low = Pipeline.load(memory="low")
    # 4-latent tiles: strips of 8 rows at 16 latent rows, so boundaries and halos are crossed
    pixels = np.asarray(to_pil(low.decode_latents(latents, tile=SMALL_TILE))[0])
    check("low memory: VAE decoded in strips", pixels, want, t)


def serve(want: np.ndarray) -> None:
    """`edge-sdk serve` embedded in this process (uvicorn on a socket bound here), one
    txt2img over A1111's API: the same generation as the first check."""
    import base64
    import io
    import socket

    import uvicorn
    from PIL import Image

    from edge_sdk import Pipeline
    from edge_sdk.serve import Registry, build_server, create_app
    t = time.perf_counter()
    server = build_server(Registry(), lambda path: Pipeline.load(path))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)  # listening now: a request made before uvicorn runs waits in the backlog
    http = uvicorn.Server(uvicorn.Config(create_app(server), http="h11", loop="asyncio",
                                         lifespan="off", log_level="warning"))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    body = json.dumps({"prompt": PROMPT, "seed": SEED, "steps": STEPS}).encode()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/sdapi/v1/txt2img"
    req = urllib.request.Request(url, body, headers={"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(req, timeout=600).read())
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(reply["images"][0])))
                     .convert("RGB"))
    http.should_exit = True
    thread.join(60)
    server.worker.stop(timeout=60)
    check("edge-sdk serve: txt2img over HTTP", got, want, t)


def main() -> int:
    ref = np.load(sys.argv[1])
    t = time.perf_counter()
    image, latents = generate()
    check("onnxruntime: the default model", image, ref["onnx"], t)
    t = time.perf_counter()
    same = seen(ref["onnx"]) == str(ref["seen"])  # OpenCV on aarch64 reads what it did on x86
    print(f"{'shapes evaluator (OpenCV)':<34}{time.perf_counter() - t:7.1f} s   "
          f"{'ok' if same else 'FAIL'}: {ref['seen']}", flush=True)
    if not same:
        failures.append("evaluator")
    low_memory(latents, ref["onnx"])
    t = time.perf_counter()
    check("tiny decoder", decode_tiny(latents), ref["tiny"], t)
    t = time.perf_counter()
    check("live preview (preview decoder)", preview(latents), ref["preview"], t)
    t = time.perf_counter()
    check("feature caching (cache_interval 2)", cached(), ref["cached"], t)
    t = time.perf_counter()
    check("shapes-lcm: 4 LCM steps", few_step(), ref["lcm"], t)
    t = time.perf_counter()
    check("LoRA at load time, weighted prompt", with_lora(lora_file(sys.argv[1])),
          ref["lora"], t)
    t = time.perf_counter()
    check("img2img (strength 0.5)", edit(ref["source"], None), ref["img2img"], t)
    t = time.perf_counter()
    check("inpainting, low memory", edit(ref["source"], ref["mask"], memory="low"),
          ref["inpaint"], t)
    t = time.perf_counter()
    check("LiteRT: the default model", generate(sys.argv[2], backend="tflite")[0],
          ref["tflite"], t)
    t = time.perf_counter()
    check_int8("W8A8 static QDQ UNet (NPU bundle)", generate(sys.argv[3])[0], ref["w8a8"], t)
    t = time.perf_counter()
    check("SDXL (tiny), low memory", sdxl(sys.argv[4]), ref["sdxl"], t)
    t = time.perf_counter()
    check("ControlNet (Canny edges), low memory", controlled(), ref["controlled"], t)
    serve(ref["onnx"])
    print("arm64 smoke " + (f"FAILED: {', '.join(failures)}" if failures else "passed"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
