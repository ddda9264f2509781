# shellcheck shell=bash
# Sourced by tests/arm64/run.sh and tests/docker/stage.sh: qemu's aarch64 handler registered
# with binfmt (F flag: no qemu binary needed inside a root filesystem or container), and
# write_cpuinfo FILE: the ARM /proc/cpuinfo that onnxruntime needs under qemu, which shows the
# host's x86 one (onnxruntime then finds no ARM core and segfaults; shared/ARM64.md).
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 || update-binfmts --import qemu-aarch64

write_cpuinfo() {  # Cortex-A72 (Pi 4) blocks, one per host core
  local i; : > "$1"
  for i in $(seq 0 $(($(nproc)-1))); do
    printf 'processor\t: %s\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >> "$1"
  done
}
