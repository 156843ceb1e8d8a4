"""score_select's working memory: per thread, bounded by its slice of the candidates, and an allocation failure is a
MemoryError, not an abort of the process (found by review: each OpenMP thread reserved ~2k entries of the global k,
threads x 2n x 16 bytes with k near n, and a std::bad_alloc inside the parallel region called std::terminate)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("kvsched._C")

CHILD = textwrap.dedent("""
    import resource, sys, torch
    from kvsched.ops import score
    n, threads, budget_mb = (int(a) for a in sys.argv[1:4])
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    cols = [torch.rand(n, generator=g, dtype=torch.float64) * 100 for _ in range(6)]
    score.score_and_select(*cols, None, 8, impl="cxx")  # the team's threads and arenas exist before the limit
    used = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)  # under `ulimit -v` the hard limit is set too: keep it
    limit = used + budget_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        out = score.score_and_select(*cols, None, n, impl="cxx")
        print("ok", out.numel())
    except MemoryError:
        print("MemoryError")
""")


def run(n: int, threads: int, budget_mb: int) -> subprocess.CompletedProcess[str]:
    # every large allocation a fresh mmap (counted against RLIMIT_AS), none taken from a heap's slack or a thread
    # arena's reserved room (a fresh clone's make test found the buffers fitting in those)
    env = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads),
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", CHILD, str(n), str(threads), str(budget_mb)], capture_output=True,
                          text=True, timeout=120, env={**env, **_pythonpath()})


def _pythonpath() -> dict[str, str]:
    import os

    return {"PYTHONPATH": os.pathsep.join(sys.path)}


def test_selecting_nearly_all_of_many_candidates_fits_in_memory_of_its_size():
    # 1M candidates, k = n, 16 threads: the result and the merge need ~50 MB; per-thread buffers of 2k entries ~512 MB
    got = run(1_000_000, 16, 160)
    assert got.returncode == 0, got.stderr[-600:]
    assert got.stdout.split() == ["ok", "1000000"]


def test_an_allocation_failure_is_a_memory_error_not_an_abort():
    # 4M candidates on 4 threads: the 32 MB result fits in 40 MB more address space, four 16 MB buffers do not
    got = run(4_000_000, 4, 40)
    assert got.returncode == 0, got.stderr[-600:]
    assert got.stdout.strip() == "MemoryError"
