"""The host's memory as kvsched reads it (`tier_host.host_memory`: the FP8 tier's sizing, its size check and `kvsched
bench replay`'s pool refusal) is at most this process's cgroup limit. Found by review (review68): psutil's total is the
whole machine's (/proc/meminfo), so inside an 8 GiB container on a 256 GiB host a replay's pools of 100 GiB, or a
tier sized from 256 GiB, passed, for the kernel's OOM killer to end the server. The cgroup files are faked under
tmp_path: v2 (a group inside the unified mount), v1 (a memory controller line), a container's namespaced view."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.adapters.vllm import cgroup_memory, tier_host
from kvsched.bench import replay_memory

GIB = 2**30


def fake(monkeypatch: pytest.MonkeyPatch, root: Path, proc: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "proc_cgroup").write_text(proc)
    monkeypatch.setattr(cgroup_memory, "CGROUP_ROOT", root / "sys")
    monkeypatch.setattr(cgroup_memory, "PROC_CGROUP", root / "proc_cgroup")


def test_v2_the_smallest_limit_of_the_group_and_those_above_it(tmp_path, monkeypatch):
    fake(monkeypatch, tmp_path, "0::/kubepods/pod1/c1\n",
         {"sys/cgroup.controllers": "cpu memory", "sys/kubepods/memory.max": str(16 * GIB),
          "sys/kubepods/pod1/memory.max": str(8 * GIB), "sys/kubepods/pod1/c1/memory.max": "max"})
    assert cgroup_memory.cgroup_memory_limit() == 8 * GIB


def test_v1_a_memory_controller_line_and_v1s_unlimited(tmp_path, monkeypatch):
    fake(monkeypatch, tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
         {"sys/memory/docker/abc/memory.limit_in_bytes": str(2 * GIB),
          "sys/memory/memory.limit_in_bytes": "9223372036854771712"})
    assert cgroup_memory.cgroup_memory_limit() == 2 * GIB
    (tmp_path / "sys/memory/docker/abc/memory.limit_in_bytes").write_text("9223372036854771712")
    assert cgroup_memory.cgroup_memory_limit() is None


def test_a_containers_namespaced_view_reads_the_mounts_own_files(tmp_path, monkeypatch):
    """Inside the container the group named (a host path) is absent under the mount: the mount's files are its own."""
    fake(monkeypatch, tmp_path, "4:memory:/process_api/c280\n", {"sys/memory/memory.limit_in_bytes": str(4 * GIB)})
    assert cgroup_memory.cgroup_memory_limit() == 4 * GIB


def test_no_cgroup_filesystem_is_no_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroup_memory, "PROC_CGROUP", tmp_path / "absent")
    assert cgroup_memory.cgroup_memory_limit() is None


def test_host_memory_and_the_replay_refusal_read_the_containers_limit(tmp_path, monkeypatch):
    fake(monkeypatch, tmp_path, "0::/\n", {"sys/cgroup.controllers": "memory", "sys/memory.max": str(2 * GIB)})
    total, available = tier_host.host_memory()
    assert (total, available <= 2 * GIB) == (2 * GIB, True)
    with pytest.raises(ValueError, match=r"3 blocks in all .* past this host's 2.0 GiB of memory"):
        replay_memory.refuse_past_host(1.0, [replay_memory.SideMemory("stock", 3)], GIB)  # past the container only
