#!/usr/bin/env bash
# Run a command inside an emulated arm64 Debian bookworm (Python 3.11, like Raspberry Pi OS
# 64-bit) with the runtime's aarch64 wheels, under qemu-user + binfmt, in a private mount
# namespace. Adapted from shared/arm64/arm64-run.sh (see shared/ARM64.md for the traps).
#   tests/arm64/run.sh python -m edge_sdk.cli selftest
# Cache: $ARM_CACHE (default /var/cache/edge-sdk-arm64): rootfs + wheels, ~400 MB.
set -euo pipefail
CACHE=${ARM_CACHE:-/var/cache/edge-sdk-arm64}; R=$CACHE/rootfs
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
# the runtime's pinned wheels (the same list the Docker image installs), LiteRT, the test runner
REQS="$(cat "$ROOT/docker/requirements-runtime.txt" "$ROOT/docker/requirements-tflite.txt" \
          "$ROOT/docker/requirements-serve.txt" |
        grep -v '^#' | tr '\n' ' ') pytest==9.2.0"
export QEMU_CPU=${QEMU_CPU:-cortex-a72}   # Pi 4 (cortex-a76 = Pi 5); "max" gives spurious FP warnings
if ! command -v qemu-aarch64-static >/dev/null || ! command -v mmdebstrap >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static binfmt-support mmdebstrap >/dev/null
fi
# shellcheck source=tests/arm64/binfmt.sh
. "$HERE/binfmt.sh"
if [ ! -x "$R/opt/venv/bin/python" ]; then      # rootfs: unpack only, no emulated maintainer scripts
  rm -rf "$R"; mkdir -p "$CACHE"
  mmdebstrap --quiet --architectures=arm64 --variant=extract \
    --include=python3,libstdc++6,base-files,base-passwd,coreutils,bash,dash,ca-certificates bookworm "$R"
  cp "$R"/usr/share/base-passwd/passwd.master "$R"/etc/passwd; cp "$R"/usr/share/base-passwd/group.master "$R"/etc/group
  [ -e "$R"/bin/sh ] || ln -s dash "$R"/bin/sh
  chroot "$R" /usr/bin/python3 -m venv --without-pip /opt/venv
fi
STAMP="$R/opt/venv/.reqs"; if [ "$(cat "$STAMP" 2>/dev/null)" != "$REQS" ]; then   # wheels, by the HOST's pip
  PLAT="--platform manylinux2014_aarch64"; for v in $(seq 17 36); do PLAT+=" --platform manylinux_2_${v}_aarch64"; done
  SP="$R"/opt/venv/lib/python3.11/site-packages; rm -rf "$SP"; mkdir -p "$SP"
  python3 -m pip install -q --only-binary=:all: $PLAT --python-version 3.11 --implementation cp --abi cp311 --target "$SP" $REQS
  echo "$REQS" > "$STAMP"
fi
export CPUINFO=$CACHE/cpuinfo; write_cpuinfo "$CPUINFO"
mkdir -p "$R/src"
cd "$ROOT"
exec unshare --mount --propagation private /bin/bash -c '
  R=$1; shift; mount -t proc proc $R/proc; mount --bind $CPUINFO $R/proc/cpuinfo; mount -t sysfs sysfs $R/sys
  mount --rbind /dev $R/dev; mount -t tmpfs tmpfs $R/tmp; mount --bind "$PWD" $R/src
  exec chroot $R /usr/bin/env -i HOME=/root LANG=C.UTF-8 QEMU_CPU=$QEMU_CPU PATH=/opt/venv/bin:/usr/bin:/bin \
    PYTHONPATH=/src PYTHONDONTWRITEBYTECODE=1 /bin/sh -c "cd /src && exec \"\$@\"" sh "$@"' _ "$R" "$@"
