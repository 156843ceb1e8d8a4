"""The memory limit of this process's cgroup (a container's `--memory`, a systemd unit's MemoryMax), which the host's
total does not show: psutil (and sysconf) read /proc/meminfo, the whole machine's. A KV pool or an FP8 tier sized
past the limit is not refused, then the kernel's OOM killer ends the server (found by review: the replay refusal and
the tier's sizing read a 256 GiB host's memory inside an 8 GiB container).

cgroup v2 (`0::/PATH` in /proc/self/cgroup): `memory.max` of the process's group and of each group above it under
the unified mount; cgroup v1 (a `memory` controller line): `memory.limit_in_bytes` likewise under the memory mount.
The smallest limit found applies ("max", or v1's page-rounded 2**63, is none). Inside a container's cgroup namespace
the group is `/` and the mount's own files are the container's."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
NO_LIMIT = 2**62  # v1 writes "unlimited" as 2**63 rounded down to a page


def _limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max"
        return None
    value = int(text)
    return value if 0 < value < NO_LIMIT else None


def _groups() -> list[tuple[Path, str, str]]:
    """(mount, group path, limit file) for each memory hierarchy /proc/self/cgroup names."""
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
            out.append((unified, group, "memory.max"))
        elif "memory" in controllers.split(","):
            out.append((CGROUP_ROOT / controllers, group, "memory.limit_in_bytes"))
    return out


def cgroup_memory_limit() -> int | None:
    """Bytes this process's cgroups allow it at most, or None (no limit, or no cgroup filesystem to read)."""
    limits: list[int] = []
    for mount, group, name in _groups():
        here = mount / group.lstrip("/")
        # the group's and every group above it, to the mount's own (all a namespaced view has: its group is absent)
        for directory in (here, *here.parents):
            if directory != mount and mount not in directory.parents:
                break
            if (value := _limit(directory / name)) is not None:
                limits.append(value)
    return min(limits, default=None)
