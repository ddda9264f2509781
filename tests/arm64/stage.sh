#!/usr/bin/env bash
# The emulated aarch64 CI stage: on arm64 Debian bookworm (Python 3.11, as Raspberry Pi OS
# 64-bit) with only the runtime's aarch64 wheels, run the runtime's tests (those needing the
# converter are deselected; a skip fails the stage) and `edge-sdk selftest`, which generates
# with the shipped default model and checks what the evaluator sees. Exit non-zero on failure.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# Emulation runs numpy and onnxruntime 40-60x slower (a 20-step generation: ~40 s), so the
# multi-seed default-model tests and the NPU example stay native; here one generation
# (selftest) and the IoT example's service loop, which generates over HTTP.
TESTS="tests/test_schedulers_unit.py tests/test_shapes_evaluator.py tests/test_torch_free.py
       tests/test_examples.py"
start=$SECONDS
echo "== emulated arm64 stage (QEMU_CPU=${QEMU_CPU:-cortex-a72})"
bash "$HERE/run.sh" /bin/sh -ec "
  echo \"machine: \$(uname -m)\"
  EDGE_SDK_RUNTIME_ONLY=1 python -m pytest -q -p no:cacheprovider -k 'not npu' $(echo $TESTS)
  python -m edge_sdk.cli selftest"
echo "== emulated arm64 stage passed in $((SECONDS - start)) s"
