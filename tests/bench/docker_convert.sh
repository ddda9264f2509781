#!/usr/bin/env bash
# Builds docker/convert.Dockerfile, unchanged, for linux/amd64 with podman (offline: a stand-in
# base image and wheels fetched by the host's pip, torch 2.13.0 CPU among them, as
# tests/docker/stage.sh does for the runtime image), then, inside the image, makes the tests'
# tiny SD 1.x checkpoint (`edge-convert synth --arch tiny-sd1`), converts it to int8 as a
# user that is not the image's own (--user, as docker/README.md runs it) and generates with
# it, printing the time of each step and the image size.
# torch must come as its CPU wheel: this machine's pip finds it on disk; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (PyPI's torch is a CUDA build).
# A benchmark, not a CI step: the cold build alone takes minutes (torch and the converter's
# ~1 GB of wheels). Needs root (podman); caches as the container stage does.
#   bash tests/bench/docker_convert.sh
set -euo pipefail
# shellcheck source=tests/docker/lib.sh
. "$(dirname "$0")/../docker/lib.sh"
DOCKERFILE=$ROOT/docker/convert.Dockerfile; A=amd64
t=$SECONDS
base $A "$DOCKERFILE"
w=$(wheels $A convert torch==2.13.0 -r "$ROOT/docker/requirements-convert.txt" \
    -r "$ROOT/docker/requirements-runtime.txt" "${BUILD_REQS[@]}")
echo "base image and wheels ready in $((SECONDS - t)) s"; t=$SECONDS
build_image $A "$DOCKERFILE" edge-convert:$A "$w"
echo "edge-convert:$A built in $((SECONDS - t)) s, image size $(image_size $A edge-convert:$A)"
# as docker/README.md says to run it: --user, the owner of the folder (not the image's uid 1000)
work=$(mktemp -d); chown 1234:1234 "$work"
run=(pod "$A" run --rm --network none --user 1234:1234 -v "$work:/work")
t=$SECONDS; "${run[@]}" edge-convert:$A synth --arch tiny-sd1 -o /work/ckpt >/dev/null
echo "tiny-sd1 checkpoint made in the container in $((SECONDS - t)) s"
t=$SECONDS; "${run[@]}" edge-convert:$A /work/ckpt -o /work/bundle --precision int8 >"$CACHE/convert.log" 2>&1 ||
  { tail -20 "$CACHE/convert.log"; exit 1; }
echo "converted to int8 in the container in $((SECONDS - t)) s: $(du -sh "$work/bundle" | cut -f1)"
t=$SECONDS
"${run[@]}" --entrypoint edge-sdk edge-convert:$A \
  generate "a red circle on a blue background" --model /work/bundle --steps 4 -o /work/out.png >/dev/null 2>&1
[ -s "$work/out.png" ] || { echo "no image from the converted bundle"; exit 1; }
echo "generated with it in $((SECONDS - t)) s: $(stat -c %s "$work/out.png") bytes"
rm -rf "$work"; release_image $A edge-convert:$A "$DOCKERFILE"
echo "convert image: PASS"
