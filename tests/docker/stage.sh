#!/usr/bin/env bash
# The container CI stage: builds docker/runtime.Dockerfile, unchanged, for linux/amd64 and
# linux/arm64 (emulated through qemu's binfmt handler) with podman, runs `edge-sdk selftest`
# inside each image, prints each image's size, and runs docker/README.md's quick start (an
# empty root-owned out/, as docker makes a missing bind-mount source, on /out) and
# `edge-sdk serve` (one image requested from it inside the container) on amd64.
# No registry is reachable from CI, so:
#  - the Dockerfile's base image (FROM) is made here, per platform, from Debian bookworm
#    packages (tests/docker/base.sh) and given the FROM name;
#  - the wheels are fetched by the host's pip for the target platform and mounted into the
#    build, which installs them with pip's own settings as build arguments
#    (PIP_NO_INDEX/PIP_FIND_LINKS); users' builds leave them unset and use PyPI.
# Both are cached under $DOCKER_CACHE (default /var/cache/edge-sdk-docker), keyed by what they
# are made from, and so is podman's storage, one per platform (see below). The two platforms
# build and run side by side: arm64's emulated steps are the long pole.
# Budget: 3 min with the cache warm, 10 min cold. Exit non-zero on failure.
set -euo pipefail
# shellcheck source=tests/docker/lib.sh
. "$(dirname "$0")/lib.sh"
start=$SECONDS
DOCKERFILE=$ROOT/docker/runtime.Dockerfile
export POD_TIMEOUT=${POD_TIMEOUT:-900}  # s for one podman command: a hung emulation fails
REQS=(-r "$ROOT/docker/requirements-runtime.txt" -r "$ROOT/docker/requirements-tflite.txt"
      -r "$ROOT/docker/requirements-serve.txt")
NOTHING_HEAVY='import importlib.util as u, shutil, sys
bad = [m for m in ("torch", "diffusers", "transformers", "onnx", "litert_torch") if u.find_spec(m)]
bad += [c for c in ("gcc", "cc", "g++", "clang", "make") if shutil.which(c)]
print("in the image: no torch, converter stack or compiler" if not bad else f"in the image: {bad}")
sys.exit(bool(bad))'

# `edge-sdk serve` in the image: health, then one txt2img over A1111's API, checked as a PNG
SERVE_CLIENT='import base64, io, json, time, urllib.request
from PIL import Image
url, t = "http://127.0.0.1:7860", time.time()
while True:
    try:
        if json.load(urllib.request.urlopen(url + "/health"))["status"] == "ok": break
    except OSError: pass
    assert time.time() - t < 120, "serve did not become healthy"; time.sleep(0.5)
req = urllib.request.Request(url + "/sdapi/v1/txt2img", headers={"Authorization": "Bearer ci-key",
    "Content-Type": "application/json"}, data=json.dumps({"prompt": "a red circle on a blue background",
    "steps": 4, "width": 64, "height": 64, "seed": 1}).encode())
img = Image.open(io.BytesIO(base64.b64decode(json.load(urllib.request.urlopen(req))["images"][0])))
assert img.size == (64, 64) and "Seed: 1" in img.info["parameters"], (img.size, img.info)
print(f"serve in the image: healthy, then a 64x64 PNG over /sdapi/v1/txt2img, {time.time() - t:.1f} s")'

serve_check() {  # serve_check ARCH RUN...: the image serving (detached), a client inside it,
  local arch=$1 cid code a run=(); shift  # then SIGTERM: it must drain and exit by itself
  for a in "$@"; do [ "$a" = --rm ] || run+=("$a"); done  # kept, to read its exit code
  cid=$("${run[@]}" -d "edge-sdk:$arch" serve --host 0.0.0.0 --api-key ci-key)
  pod "$arch" exec "$cid" python3 -c "$SERVE_CLIENT" || { pod "$arch" logs "$cid" | tail -20
    pod "$arch" rm -f "$cid" >/dev/null; return 1; }
  pod "$arch" stop -t 30 "$cid" >/dev/null  # SIGTERM; SIGKILL (137) after 30 s would fail
  code=$(pod "$arch" inspect -f '{{.State.ExitCode}}' "$cid"); pod "$arch" rm -f "$cid" >/dev/null
  case $code in 0|143) echo "serve stopped by SIGTERM: drained, exit $code" ;;
    *) echo "serve: exit $code after SIGTERM, not 0 or 143"; return 1 ;; esac
}

check() {  # check ARCH: build the runtime image for linux/ARCH and run selftest in it
  local arch=$1 t=$SECONDS w run out owner
  # unnamed layers made over a week ago: old code's layers, and the dependency layers once a
  # week (a cold rebuild then: ~145 s for arm64)
  pod "$arch" image prune -f --filter until=168h >/dev/null
  base "$arch" "$DOCKERFILE"; w=$(wheels "$arch" runtime "${REQS[@]}" "${BUILD_REQS[@]}")
  build_image "$arch" "$DOCKERFILE" "edge-sdk:$arch" "$w"
  echo "edge-sdk:$arch built in $((SECONDS - t)) s, image size $(image_size "$arch" "edge-sdk:$arch")"
  # onnxruntime under qemu needs an ARM /proc/cpuinfo and a real CPU model (shared/ARM64.md)
  run=(pod "$arch" run --rm --network none --platform "linux/$arch")
  [ "$arch" = arm64 ] && run+=(-e "QEMU_CPU=${QEMU_CPU:-cortex-a72}" -v "$CPUINFO:/proc/cpuinfo:ro")
  "${run[@]}" "edge-sdk:$arch" selftest
  if [ "$arch" = amd64 ]; then  # small: no torch (or other converter stack), no compiler
    "${run[@]}" --entrypoint python3 "edge-sdk:$arch" -c "$NOTHING_HEAVY"
    # the quick start: `docker run --rm -v "$PWD/out:/out" IMAGE`
    out=$(mktemp -d); chmod 755 "$out"
    "${run[@]}" -v "$out:/out" "edge-sdk:$arch" >"$CACHE/quickstart.log" 2>&1 || {
      tail -20 "$CACHE/quickstart.log"; return 1; }
    owner=$(stat -c %u "$out/out.png" 2>/dev/null || echo none); rm -rf "$out"
    [ "$owner" = 1000 ] || { echo "quick start: out/out.png owner $owner, not uid 1000"; return 1; }
    echo "quick start into an empty root-owned out/: out.png written by uid $owner"
    serve_check "$arch" "${run[@]}"
  fi
  release_image "$arch" "edge-sdk:$arch" "$DOCKERFILE"
  echo "linux/$arch: selftest passed in the image, $((SECONDS - t)) s"
}

echo "== container stage: runtime image for linux/arm64 and linux/amd64, side by side"
# background subshells (set -e holds inside each), their lines shown as they come, prefixed
check arm64 > >(sed -u "s/^/[arm64] /") 2>&1 & arm=$!
check amd64 > >(sed -u "s/^/[amd64] /") 2>&1 & amd=$!
wait $amd && amd=0 || amd=$?
wait $arm && arm=0 || arm=$?
[ $amd = 0 ] && [ $arm = 0 ] || { echo "== container stage FAILED"; exit 1; }
echo "== container stage passed in $((SECONDS - start)) s"
