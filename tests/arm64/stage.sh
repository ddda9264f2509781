#!/usr/bin/env bash
# The emulated aarch64 CI stage: on arm64 Debian bookworm (Python 3.11, as Raspberry Pi OS
# 64-bit) with only the runtime's aarch64 wheels, one process (tests/arm64/smoke.py) makes one
# small generation per feature — onnxruntime, low memory with the VAE in tiles, the tiny and
# preview decoders, feature caching, shapes-lcm, img2img, inpainting, LiteRT, the W8A8 (NPU)
# bundle on the CPU, a tiny SDXL bundle, the default model's ControlNet (Canny edges), the
# IoT example over HTTP — and compares each with the same generation made natively here
# (tests/arm64/reference.py).
# Budget: 5 min with the cache warm. Exit non-zero on failure.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${ARM_CACHE:-/var/cache/edge-sdk-arm64}
start=$SECONDS
# The default model as a TFLite bundle for the LiteRT check, converted here (the converter is
# x86-only) and cached by what it is made from: the checkpoint, the converter, the runtime
# and the package versions (the files as they are now). A conversion takes ~1.5 min, ~16 s
# when only the runtime changed: its fp32 exports are kept (--export-cache, keyed by the
# weights, the converter's code and the package versions; unused for a week: removed).
KEY=$(cd "$ROOT" && { git ls-files -z models/shapes/checkpoint converters edge_sdk pyproject.toml |
      xargs -0 sha256sum; python -m pip freeze 2>/dev/null; } | sha256sum | cut -c1-16)
TFL=.arm64-tflite-bundle
mkdir -p "$CACHE/exports"
find "$CACHE/exports" -type f -mtime +7 -delete
if [ ! -f "$CACHE/tflite-$KEY/manifest.json" ]; then
  rm -rf "$CACHE"/tflite-*
  (cd "$ROOT" && python -m converters.cli models/shapes/checkpoint -o "$CACHE/tflite-$KEY" \
     --format tflite --name shapes --no-vae-encoder --default-steps 20 --default-guidance 2 \
     --export-cache "$CACHE/exports" \
     >"$CACHE/convert.log" 2>&1) || { tail -20 "$CACHE/convert.log"; exit 1; }
fi
rm -rf "${ROOT:?}/$TFL" && cp -r "$CACHE/tflite-$KEY" "$ROOT/$TFL"
# The default model with its UNet as W8A8 static QDQ (the NPU bundle: 128x128, batch 1),
# cached the same way (~70 s to convert and calibrate)
W8=.arm64-w8a8-bundle
if [ ! -f "$CACHE/w8a8-$KEY/manifest.json" ]; then
  rm -rf "$CACHE"/w8a8-*
  (cd "$ROOT" && python -m converters.cli models/shapes/checkpoint -o "$CACHE/w8a8-$KEY" \
     --precision w8a8 --sizes 128x128 --name shapes-w8a8 --no-vae-encoder --no-vae-stages \
     --default-steps 20 --default-guidance 2 \
     >"$CACHE/convert-w8a8.log" 2>&1) || { tail -20 "$CACHE/convert-w8a8.log"; exit 1; }
fi
rm -rf "${ROOT:?}/$W8" && cp -r "$CACHE/w8a8-$KEY" "$ROOT/$W8"
# A tiny SDXL-architecture bundle (two text encoders, added conditions), built from a fixed
# seed and cached the same way (~15 s)
XL=.arm64-sdxl-bundle
if [ ! -f "$CACHE/sdxl-$KEY/manifest.json" ]; then
  rm -rf "$CACHE"/sdxl-*
  (cd "$ROOT" && python -m converters.cli synth --arch tiny-sdxl -o "$CACHE/sdxl-checkpoint" \
     && python -m converters.cli "$CACHE/sdxl-checkpoint" -o "$CACHE/sdxl-$KEY" \
        --name tiny-sdxl --no-vae-encoder --no-vae-stages \
     >"$CACHE/convert-sdxl.log" 2>&1) || { tail -20 "$CACHE/convert-sdxl.log"; exit 1; }
  rm -rf "$CACHE/sdxl-checkpoint"
fi
rm -rf "${ROOT:?}/$XL" && cp -r "$CACHE/sdxl-$KEY" "$ROOT/$XL"
(cd "$ROOT" && python tests/arm64/reference.py "$TFL" "$TFL/reference.npz" "$W8" "$XL")
echo "== emulated arm64 stage (QEMU_CPU=${QEMU_CPU:-cortex-a72}), prepared in $((SECONDS - start)) s"
bash "$HERE/run.sh" /bin/sh -ec "
  echo \"machine: \$(uname -m)\"
  EDGE_SDK_CACHE_DIR=/tmp python tests/arm64/smoke.py /src/$TFL/reference.npz /src/$TFL \
    /src/$W8 /src/$XL"
echo "== emulated arm64 stage passed in $((SECONDS - start)) s"
