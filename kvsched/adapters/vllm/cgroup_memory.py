"""The memory limit of this process's cgroup (a container's `--memory`, a systemd unit's MemoryMax), which the host's
total does not show: psutil (and sysconf) read /proc/meminfo, the whole machine's. A KV pool or an FP8 tier sized
past the limit is not refused, then the kernel's OOM killer ends the server (found by review: the replay refusal and
the tier's sizing read a 256 GiB host's memory inside an 8 GiB container).

cgroup v2 (`0::/PATH` in /proc/self/cgroup): `memory.max` of the process's group and of each group above it under
the unified mount; cgroup v1 (a `memory` controller line): `memory.limit_in_bytes` likewise under the memory mount.
The smallest limit found applies ("max", or v1's page-rounded 2**63, is none). Inside a container's cgroup namespace
the group is `/` and the mount's own files are the container's.

The room left (`cgroup_memory`) is, at each group with a limit, that limit less what the group (its processes and
the groups under it) already uses: `memory.current` (v1: `memory.usage_in_bytes`) less the page cache the kernel
reclaims first (`inactive_file` in memory.stat; v1: `total_inactive_file`), as `docker stats` and the kubelet count a
container's use; the least room of any group applies. Found by review (review69): the room was the limit itself, so
an 8 GiB container already using 6 GiB (the engine's own pool, the model) was read as 8 GiB available, where the
host's figure (psutil's `available`) subtracts what is in use. A group whose use cannot be read counts its limit."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
NO_LIMIT = 2**62  # v1 writes "unlimited" as 2**63 rounded down to a page
# (limit file, usage file, memory.stat's key of the reclaimable page cache, hierarchical) per cgroup version
V2_FILES = ("memory.max", "memory.current", "inactive_file")
V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _number(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() else None  # "max": no number


def _limit(path: Path) -> int | None:
    value = _number(path)
    return value if value is not None and 0 < value < NO_LIMIT else None


def _reclaimable(stat: Path, key: str) -> int:
    """The bytes of `key` in a memory.stat file (0 if unreadable)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value.strip())
    return 0


def _groups() -> list[tuple[Path, str, tuple[str, str, str]]]:
    """(mount, group path, its files) for each memory hierarchy /proc/self/cgroup names."""
    try:
        lines = PROC_CGROUP.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if hid == "0" and controllers == "":
            unified = CGROUP_ROOT if (CGROUP_ROOT / "cgroup.controllers").exists() else CGROUP_ROOT / "unified"
            out.append((unified, group, V2_FILES))
        elif "memory" in controllers.split(","):
            out.append((CGROUP_ROOT / controllers, group, V1_FILES))
    return out


def cgroup_memory() -> tuple[int, int] | None:
    """(limit, room) in bytes: the least limit of this process's cgroups and the least room any of them has left
    (its limit less what it already uses, never below 0), or None (no limit, or no cgroup filesystem to read)."""
    limits: list[int] = []
    rooms: list[int] = []
    for mount, group, (limit_file, usage_file, cache_key) in _groups():
        here = mount / group.lstrip("/")
        # the group's and every group above it, to the mount's own (all a namespaced view has: its group is absent)
        for directory in (here, *here.parents):
            if directory != mount and mount not in directory.parents:
                break
            if (limit := _limit(directory / limit_file)) is None:
                continue
            limits.append(limit)
            used = _number(directory / usage_file)
            in_use = 0 if used is None else max(0, used - _reclaimable(directory / "memory.stat", cache_key))
            rooms.append(max(0, limit - in_use))
    if not limits:
        return None
    return min(limits), min(rooms)


def cgroup_memory_limit() -> int | None:
    """Bytes this process's cgroups allow it at most, or None (no limit, or no cgroup filesystem to read)."""
    found = cgroup_memory()
    return None if found is None else found[0]
