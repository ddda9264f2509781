"""Operating-system mechanics behind the memory plans: glibc's allocator, the resident set
of mapped files (Linux /proc and madvise). Each function is a no-op returning False / 0 where
the mechanism does not exist, so the plans degrade to "uses more memory", never to failing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator

# Blocks at least this large are mmap()ed by glibc, so free() hands them straight back
MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)


def return_freed_memory() -> bool:
    """Stop glibc's malloc from keeping freed activations (process-wide; True if done).

    Without its arena, onnxruntime mallocs and frees every activation. glibc raises its
    mmap threshold after the first large free (up to 32 MB), so later activations come from
    the heap and stay there, fragmented, after they are freed: an SD 1.5 UNet call at
    512x512 then held 1,077 MiB of private memory that was mostly free, against 183 MiB
    with a fixed 64 KiB threshold (measured; one call each: 7.6 s against 5.4-7.2 s).
    Fixing the threshold turns the adjustment off."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


_MADV_DONTNEED = 4  # Linux
# a mapping's first line in /proc/self/smaps: start-end perms offset dev inode [path]
_SMAPS_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+ *(.*)$")


def drop_mapped_pages(files: Iterable[str | os.PathLike[str]]) -> int:
    """Take the pages of `files` that this process maps out of its resident set; returns
    the bytes dropped (0 where /proc/self/smaps or madvise is missing).

    onnxruntime maps external weights tensor by tensor; every page a run touched stays
    counted in the process's RSS until the mapping goes, even while another component runs:
    in balanced mode an SD 1.5 text encoder's 237 MB sat beside the UNet's 822 MB. After
    MADV_DONTNEED the pages stay in the page cache, so the next run of that component maps
    them back with minor faults (no disk read unless the kernel evicted them meanwhile).
    Only mappings holding no private (copy-on-write) page are touched: for those, dropping
    loses nothing, the file holds exactly what was mapped."""
    import ctypes
    wanted = {os.path.realpath(f) for f in files}
    try:
        text = Path("/proc/self/smaps").read_text()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    dropped = 0
    for start, end, rss, anonymous in _file_mappings(text, wanted):
        if anonymous == 0 and rss > 0 and madvise(start, end - start, _MADV_DONTNEED) == 0:
            dropped += rss
    return dropped


def mapped_resident_bytes(files: Iterable[str | os.PathLike[str]]) -> int:
    """Bytes of `files` that this process maps and has resident (0 without /proc)."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    return sum(m[2] for m in _file_mappings(text, {os.path.realpath(f) for f in files}))


def _file_mappings(smaps: str, paths: set[str]) -> Iterator[tuple[int, int, int, int]]:
    """(start, end, Rss bytes, Anonymous bytes) of each mapping of one of `paths`."""
    current: list[int] | None = None
    for line in smaps.splitlines():
        head = _SMAPS_HEADER.match(line)
        if head:
            if current:
                yield tuple(current)  # type: ignore[misc]
            current = ([int(head.group(1), 16), int(head.group(2), 16), 0, 0]
                       if head.group(3) in paths else None)
        elif current is not None and line.startswith(("Rss:", "Anonymous:")):
            current[2 if line.startswith("Rss:") else 3] = int(line.split()[1]) * 1024
    if current:
        yield tuple(current)  # type: ignore[misc]


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"),
                    root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this process's memory cgroup (a container's `docker run -m`, a systemd
    MemoryMax) lets it add before a limit, or None where no limit applies: at each level from
    its cgroup up to the root that has a limit, the limit less the anonymous and shared
    memory charged there (siblings included; page cache is left out, the kernel drops it to
    stay under); the least of those. cgroup v1 and v2."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    entries = [ln.split(":", 2) for ln in lines if ln.count(":") >= 2]
    v1 = [path for _, ctrls, path in entries if "memory" in ctrls.split(",")]
    v2 = [path for hid, ctrls, path in entries if hid == "0" and not ctrls]
    if v1:
        mount, limit_file, used_keys = root / "memory", "memory.limit_in_bytes", \
            ("total_rss", "total_shmem")
    elif v2:
        mount, limit_file, used_keys = root, "memory.max", ("anon", "shmem")
    else:
        return None
    leaf = _cgroup_dir(mount, (v1 or v2)[0])
    rooms = []
    for folder in [leaf, *leaf.parents]:
        limit = _read_int(folder / limit_file)
        if limit is not None and limit < 2**62:  # v1 writes "no limit" as a huge number
            stat = _read_stat(folder / "memory.stat")
            rooms.append(max(limit - sum(stat.get(k, 0) for k in used_keys), 0))
        if folder == mount:
            break
    return min(rooms) if rooms else None


def process_memory() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes (Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def own_private_bytes() -> int:
    """This process's anonymous (private) resident memory, 0 where /proc cannot say."""
    return process_memory().get("RssAnon", 0)


def _cgroup_dir(mount: Path, path: str) -> Path:
    """The cgroup's folder; inside a container (cgroup namespace) the mount is its own."""
    leaf = mount / path.lstrip("/")
    return leaf if leaf.is_dir() else mount


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; None for "max", a missing file or anything unreadable."""
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_stat(path: Path) -> dict[str, int]:
    try:
        pairs = (ln.split() for ln in path.read_text().splitlines())
        return {p[0]: int(p[1]) for p in pairs if len(p) == 2 and p[1].isdigit()}
    except OSError:
        return {}
