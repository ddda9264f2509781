# shellcheck shell=bash
# Sourced by tests/docker/stage.sh and tests/bench/docker_convert.sh: podman set up to build
# and run this repository's Dockerfiles on a machine that reaches no registry.
#   pod ARCH ARGS...     podman on ARCH's own storage (so each platform has its FROM image)
#   base ARCH DOCKERFILE the stand-in for DOCKERFILE's base image on linux/ARCH, named as its FROM
#   wheels ARCH NAME ARGS...  a folder of linux/ARCH wheels for `pip download ARGS`, by the host's pip
#   build_image ARCH DOCKERFILE TAG WHEELS   the image built offline; image_size ARCH TAG;
#   release_image ARCH TAG DOCKERFILE        untagged, its layers kept as the next build's cache
# Cached under $DOCKER_CACHE (default /var/cache/edge-sdk-docker), keyed by what each is made of.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${DOCKER_CACHE:-/var/cache/edge-sdk-docker}
ARM_CACHE=${ARM_CACHE:-/var/cache/edge-sdk-arm64}
mkdir -p "$CACHE" "$ARM_CACHE"
need=()
for tool in podman:podman runc:runc mmdebstrap:mmdebstrap qemu-aarch64-static:qemu-user-static \
            update-binfmts:binfmt-support; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# shellcheck source=tests/arm64/binfmt.sh
. "$ROOT/tests/arm64/binfmt.sh"
export CPUINFO=$ARM_CACHE/cpuinfo; write_cpuinfo "$CPUINFO"
# crun refuses this machine's hybrid cgroups (runc); the default ulimits cannot be set here
export CONTAINERS_CONF=$CACHE/containers.conf
printf '[containers]\ndefault_ulimits = []\n' > "$CONTAINERS_CONF"
# podman's storage: overlay where the kernel has it, kept in the cache so that a warm run
# reuses the base images and the dependency layers (~0.7 GB a platform); otherwise vfs, which
# copies every layer, in a temporary folder removed at the end
if grep -qw overlay /proc/filesystems; then
  DRIVER=overlay; STORES=$CACHE/storage
else
  DRIVER=vfs; STORES=$(mktemp -d /var/tmp/edge-sdk-podman.XXXXXX); trap 'rm -rf "$STORES"' EXIT
fi
# what `pip wheel .` installs to build the project (its build-system requirements)
# shellcheck disable=SC2034
read -ra BUILD_REQS <<< "$(python3 -c "import tomllib;print(' '.join(tomllib.load(open('$ROOT/pyproject.toml','rb'))['build-system']['requires']))")"
[ ${#BUILD_REQS[@]} -gt 0 ] || { echo "no build-system requirements read from pyproject.toml" >&2; exit 1; }

pod() {  # pod ARCH ARGS...: podman on ARCH's own storage, so both platforms can have FROM;
  local arch=$1; shift  # each command limited to $POD_TIMEOUT seconds (0: none)
  timeout "${POD_TIMEOUT:-0}" podman --storage-driver "$DRIVER" --runtime runc --root "$STORES/$arch" \
    --runroot "/run/edge-sdk-podman-$DRIVER-$arch" "$@"
}

from() { awk '/^FROM /{print $2; exit}' "$1"; }  # from DOCKERFILE: its (first) base image

base() {  # base ARCH DOCKERFILE: the stand-in base image, imported once, named as FROM
  local tar tag; tar=$(bash "$HERE/base.sh" "$1" "$CACHE"); tag=localhost/edge-sdk-ci-$(basename "$tar" .tar)
  pod "$1" image exists "$tag" || pod "$1" import -q --arch "$1" --change "ENV=LANG=C.UTF-8" \
    --change "ENV=PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" "$tar" "$tag" >/dev/null
  pod "$1" tag "$tag" "$(from "$2")"
}

wheels() {  # wheels ARCH NAME PIP-DOWNLOAD-ARGS... -> folder of linux/ARCH cp311 wheels
  local arch=$1 name=$2 key dir plat m; shift 2
  key=$(for a in "$@"; do if [ -f "$a" ]; then basename "$a"; cat "$a"; else echo "$a"; fi; done |
        sha256sum | cut -c1-16)  # by the files' names and content, not where the clone is
  dir=$CACHE/wheels-$name-$arch-$key
  if [ ! -f "$dir/.done" ]; then
    rm -rf "$CACHE/wheels-$name-$arch-"*; m=$([ "$arch" = arm64 ] && echo aarch64 || echo x86_64)
    plat="--platform manylinux2014_$m"; for v in $(seq 17 36); do plat+=" --platform manylinux_2_${v}_$m"; done
    # shellcheck disable=SC2086
    python3 -m pip download -q --only-binary=:all: $plat --python-version 3.11 \
      --implementation cp --abi cp311 -d "$dir" "$@" \
      >"$CACHE/download-$name-$arch.log" 2>&1 || { tail -20 "$CACHE/download-$name-$arch.log" >&2; return 1; }
    touch "$dir/.done"
  fi
  echo "$dir"
}

build_image() {  # build_image ARCH DOCKERFILE TAG WHEELS: pip takes WHEELS, through its own
  local arch=$1 log=$CACHE/build-${3%%:*}-$1.log  # settings as build arguments, not an index
  pod "$arch" build -q --pull=never --platform "linux/$arch" -f "$2" \
    -v "$4:/host-wheels:ro" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/host-wheels \
    -t "$3" "$ROOT" >/dev/null 2>"$log" || { tail -30 "$log"; return 1; }
}

image_size() { pod "$1" image inspect --format '{{.Size}}' "$2" | awk '{printf "%.0f MB (uncompressed)", $1 / 1e6}'; }

release_image() {  # release_image ARCH TAG DOCKERFILE: no prune, the layers stay as a cache
  local from; from=$(from "$3")
  pod "$1" rmi -f --no-prune "$2" >/dev/null; pod "$1" untag "$from" "$from"
}
