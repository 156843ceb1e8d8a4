"""The cgroup room's edges review70 was asked about (kvsched/adapters/vllm/cgroup_memory.py), all sound on main: a
use below its group's inactive page cache (no negative use, no room past the limit), memory.stat missing (the use
counted whole), v1's unlimited at the leaf under a limited parent, `max` at the leaf under a number. The cgroup files
are faked under tmp_path (`test_cgroup_memory.fake`)."""

from __future__ import annotations

from kvsched.adapters.vllm import cgroup_memory
from tests.adapters.vllm.test_cgroup_memory import fake

GIB = 2**30


def test_a_use_below_the_inactive_cache_is_no_use_and_a_missing_stat_counts_the_use_whole(tmp_path, monkeypatch):
    fake(monkeypatch, tmp_path, "0::/c\n", {"sys/cgroup.controllers": "memory", "sys/c/memory.max": str(8 * GIB),
                                            "sys/c/memory.current": str(GIB),
                                            "sys/c/memory.stat": f"inactive_file {3 * GIB}\n"})
    assert cgroup_memory.cgroup_memory() == (8 * GIB, 8 * GIB)
    (tmp_path / "sys/c/memory.stat").unlink()
    assert cgroup_memory.cgroup_memory() == (8 * GIB, 7 * GIB)


def test_v1_unlimited_at_the_leaf_and_a_limited_parent(tmp_path, monkeypatch):
    fake(monkeypatch, tmp_path, "4:memory:/kube/pod\n",
         {"sys/memory/kube/pod/memory.limit_in_bytes": "9223372036854771712",
          "sys/memory/kube/pod/memory.usage_in_bytes": str(GIB),
          "sys/memory/kube/memory.limit_in_bytes": str(4 * GIB), "sys/memory/kube/memory.usage_in_bytes": str(3 * GIB),
          "sys/memory/kube/memory.stat": f"total_inactive_file {GIB}\ninactive_file {3 * GIB}\n"})
    assert cgroup_memory.cgroup_memory() == (4 * GIB, 2 * GIB)  # v1's hierarchical key, not the group's own


def test_v2_max_at_the_leaf_and_a_number_above(tmp_path, monkeypatch):
    fake(monkeypatch, tmp_path, "0::/a/b\n", {"sys/cgroup.controllers": "memory", "sys/a/b/memory.max": "max\n",
                                              "sys/a/b/memory.current": str(5 * GIB), "sys/a/memory.max": str(6 * GIB),
                                              "sys/a/memory.current": str(5 * GIB)})
    assert cgroup_memory.cgroup_memory() == (6 * GIB, GIB)
