#!/usr/bin/env bash
# base.sh ARCH CACHE: print the path of a root filesystem tarball that stands in for the
# runtime Dockerfile's base image (python:3.11-slim-bookworm) on linux/ARCH, making it once.
# Debian bookworm's Python 3.11 with pip, shaped where the Dockerfile relies on the official
# image: `python` and `pip` on PATH, no EXTERNALLY-MANAGED marker, useradd, setpriv.
# mmdebstrap's `extract` variant only unpacks (no maintainer scripts run, so no emulation for
# arm64: ~10 s), hence the hook writes what those scripts would: /etc/passwd, /etc/group,
# /bin/sh (in an extract hook: the extract variant runs no customize hooks). Cached by architecture and by this file (its package list and hook).
set -euo pipefail
ARCH=$1; CACHE=$2
KEY=$(sha256sum "$0" | cut -c1-16)
TAR=$CACHE/base-$ARCH-$KEY.tar
if [ ! -f "$TAR" ]; then
  rm -f "$CACHE/base-$ARCH-"*.tar
  mmdebstrap --quiet --architectures="$ARCH" --variant=extract --format=tar \
    --include=python3,python3-pip,libstdc++6,base-files,base-passwd,passwd,login,coreutils,bash,dash,util-linux,grep,sed,findutils,ca-certificates \
    --extract-hook='cp "$1"/usr/share/base-passwd/passwd.master "$1"/etc/passwd' \
    --extract-hook='cp "$1"/usr/share/base-passwd/group.master "$1"/etc/group' \
    --extract-hook='[ -e "$1"/bin/sh ] || ln -s dash "$1"/bin/sh' \
    --extract-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
    --extract-hook='mkdir -p "$1"/usr/local/bin && ln -sf /usr/bin/python3 "$1"/usr/local/bin/python && ln -sf /usr/bin/pip3 "$1"/usr/local/bin/pip' \
    bookworm "$TAR.part" >&2
  mv "$TAR.part" "$TAR"
fi
echo "$TAR"
