"""The room a container has left, as `tier_host.host_memory` reads it for the FP8 tier's default size: its cgroup's
limit less what the group already uses (less the page cache the kernel reclaims first), the least of any limited group
above it too. Found by review (review69): the room was the limit itself, so an 8 GiB container already using 6 GiB
read as 8 GiB available, where outside a container psutil's `available` subtracts what is in use. The cgroup files
are faked under tmp_path (`test_cgroup_memory.fake`) and psutil's figures are fixed."""

from __future__ import annotations

from types import SimpleNamespace

import psutil
import pytest

from kvsched.adapters.vllm import cgroup_memory, tier_host
from tests.adapters.vllm.test_cgroup_memory import fake

GIB = 2**30


@pytest.fixture(autouse=True)
def host_of_64_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=64 * GIB, available=60 * GIB))


def test_v2_the_room_is_the_limit_less_the_groups_use_less_its_reclaimable_cache(tmp_path, monkeypatch):
    fake(monkeypatch, tmp_path, "0::/\n", {"sys/cgroup.controllers": "memory", "sys/memory.max": str(8 * GIB),
                                           "sys/memory.current": str(6 * GIB),
                                           "sys/memory.stat": f"anon {5 * GIB}\ninactive_file {GIB}\nactive_file 0\n"})
    assert tier_host.host_memory() == (8 * GIB, 3 * GIB)  # 8 - (6 - 1): the engine's pool is in use already


def test_v1_and_a_parent_whose_siblings_use_most_of_its_limit(tmp_path, monkeypatch):
    """The leaf has 7 GiB of room under its own 8 GiB, its parent 1 GiB under its 10 GiB: 1 GiB is all there is."""
    fake(monkeypatch, tmp_path, "4:memory:/pods/c1\n",
         {"sys/memory/pods/memory.limit_in_bytes": str(10 * GIB), "sys/memory/pods/memory.usage_in_bytes": str(9 * GIB),
          "sys/memory/pods/c1/memory.limit_in_bytes": str(8 * GIB),
          "sys/memory/pods/c1/memory.usage_in_bytes": str(2 * GIB),
          "sys/memory/pods/c1/memory.stat": f"cache {GIB}\ninactive_file {GIB}\ntotal_inactive_file {GIB}\n"})
    assert cgroup_memory.cgroup_memory() == (8 * GIB, GIB)
    assert tier_host.host_memory() == (8 * GIB, GIB)


def test_a_limit_above_the_hosts_memory_and_a_use_past_the_limit(tmp_path, monkeypatch):
    """A limit past the machine's 64 GiB leaves the machine's figures (its room, 100 - 30, is past the host's 60 GiB
    available); a group using more than its limit (a lowered limit) has no room, not a negative one."""
    files = {"sys/cgroup.controllers": "memory", "sys/memory.max": str(100 * GIB), "sys/memory.current": str(30 * GIB)}
    fake(monkeypatch, tmp_path, "0::/\n", files)
    assert tier_host.host_memory() == (64 * GIB, 60 * GIB)
    (tmp_path / "sys/memory.max").write_text(str(4 * GIB))
    assert tier_host.host_memory() == (4 * GIB, 0)


def test_an_unreadable_use_counts_the_limit_and_max_is_no_limit(tmp_path, monkeypatch):
    fake(monkeypatch, tmp_path, "0::/a\n", {"sys/cgroup.controllers": "memory", "sys/a/memory.max": str(2 * GIB),
                                            "sys/memory.max": "max", "sys/memory.current": str(50 * GIB)})
    assert tier_host.host_memory() == (2 * GIB, 2 * GIB)  # a/memory.current absent; the root's use has no limit
    (tmp_path / "sys/a/memory.max").write_text("max\n")
    assert cgroup_memory.cgroup_memory() is None and tier_host.host_memory() == (64 * GIB, 60 * GIB)
