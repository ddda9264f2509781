#!/bin/sh
# The runtime image's entry point: `edge-sdk ARGS` as the unprivileged user `edge` (uid 1000).
# Started as root (the image's default), it first gives /out to that user when /out is an
# empty folder owned by root: `docker run -v "$PWD/out:/out" IMAGE` makes a missing out/ as
# root, and uid 1000 could not write into it. A folder that holds files is never changed, and
# where the chown is refused (root-squashed NFS) edge-sdk's own error names the folder.
# Started with --user, it runs edge-sdk as that user and changes nothing.
set -e
if [ "$(id -u)" = 0 ]; then
  if [ -d /out ] && [ "$(stat -c %u /out)" = 0 ] && [ -z "$(ls -A /out)" ]; then
    chown edge:edge /out || true
  fi
  export HOME=/home/edge
  exec setpriv --reuid=edge --regid=edge --init-groups -- edge-sdk "$@"
fi
# a --user without a home of its own: caches (LiteRT's weight cache) go to /tmp
[ -w "${HOME:-/}" ] || export HOME=/tmp
exec edge-sdk "$@"
