#!/usr/bin/env bash
# The emulated aarch64 CI stage: on arm64 Debian bookworm (Python 3.11, as Raspberry Pi OS
# 64-bit) with only the runtime's aarch64 wheels, run the runtime's tests (those needing the
# converter are deselected; a skip fails the stage) and `edge-sdk selftest`, which generates
# with the shipped default model and checks what the evaluator sees, on onnxruntime and then
# on LiteRT (a TFLite conversion of the same model). Exit non-zero on failure.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# Emulation runs numpy and onnxruntime 40-60x slower (a 20-step generation: ~40 s), so the
# multi-seed default-model tests and the NPU example stay native; here one generation
# (selftest) and the IoT example's service loop, which generates over HTTP.
TESTS="tests/test_schedulers_unit.py tests/test_shapes_evaluator.py tests/test_torch_free.py
       tests/test_examples.py"
start=$SECONDS
ROOT=$(cd "$HERE/../.." && pwd)
# The default model as a TFLite bundle, converted here (the converter is x86-only in CI), so
# that selftest also runs the LiteRT backend on aarch64. The chroot sees the repo as /src.
TFL=.arm64-tflite-bundle
(cd "$ROOT" && python -m converters.cli models/shapes/checkpoint -o "$TFL" --overwrite \
   --format tflite --name shapes --no-vae-encoder --default-steps 20 --default-guidance 2 >/dev/null 2>&1)
echo "== emulated arm64 stage (QEMU_CPU=${QEMU_CPU:-cortex-a72})"
bash "$HERE/run.sh" /bin/sh -ec "
  echo \"machine: \$(uname -m)\"
  EDGE_SDK_RUNTIME_ONLY=1 python -m pytest -q -p no:cacheprovider -k 'not npu' $(echo $TESTS)
  python -m edge_sdk.cli selftest
  EDGE_SDK_CACHE_DIR=/tmp python -m edge_sdk.cli selftest --model /src/$TFL --backend tflite"
echo "== emulated arm64 stage passed in $((SECONDS - start)) s"
