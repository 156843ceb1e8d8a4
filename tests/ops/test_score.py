"""score_and_select / retention_values: every implementation against the torch reference, and the reference against
the scalar formula of kvsched.core.scoring that the policy core uses."""

from __future__ import annotations

import math

import pytest
import torch

from kvsched.core.scoring import Candidate, retention_value, select_lowest, value_of
from kvsched.ops import score

RTOL = 1e-12  # exp differs by a few ulps between libm, Sleef and CUDA; everything else is the same float64 arithmetic


def candidates(n: int, seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 60_000, (n,), generator=g).to(dtype)
    bpt = torch.full((n,), 4096.0, dtype=dtype)  # representable in float16
    idle = (torch.rand(n, generator=g, dtype=torch.float64) * 40).to(dtype)
    nxt = (torch.rand(n, generator=g, dtype=torch.float64) * 12).to(dtype)
    role = torch.where(torch.rand(n, generator=g) < 0.2, 2.0, 1.0).to(dtype)
    reuse = torch.randint(0, 9, (n,), generator=g).to(dtype)
    return tokens, bpt, idle, nxt, role, reuse


def test_reference_is_the_policy_cores_formula():
    cols = candidates(500, seed=1)
    pinned = torch.rand(500, generator=torch.Generator().manual_seed(2)) < 0.3
    cands = [Candidate(int(t), float(b), float(i), float(x), float(r), int(u), bool(p))
             for t, b, i, x, r, u, p in zip(*(c.tolist() for c in cols), pinned.tolist(), strict=True)]
    values = score.retention_values(*cols, impl="torch")
    for v, c in zip(values.tolist(), cands, strict=True):
        assert math.isclose(v, retention_value(c), rel_tol=RTOL, abs_tol=1e-300)
    assert score.score_and_select(*cols, pinned, 40, impl="torch").tolist() == select_lowest(cands, 40)


@pytest.mark.parametrize("n", [0, 1, 7, 1023, 4097])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_implementations_match_the_reference(impl, n, dtype):
    cols = candidates(n, seed=n, dtype=dtype)
    pinned = torch.rand(n, generator=torch.Generator().manual_seed(3)) < 0.25
    ref = score.retention_values(*cols, impl="torch")
    got = score.retention_values(*cols, impl=impl)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=0.0)
    for k in (0, 1, 5, n):
        assert score.score_and_select(*cols, pinned, k, impl=impl).tolist() == \
            score.score_and_select(*cols, pinned, k, impl="torch").tolist()


def test_ties_break_by_index_and_pinned_are_never_selected(impl):
    n = 10
    cols = tuple(torch.full((n,), v, dtype=torch.float64) for v in (1000.0, 1024.0, 1.0, 2.0, 1.0, 0.0))
    pinned = torch.tensor([i % 3 == 0 for i in range(n)])
    assert score.score_and_select(*cols, pinned, 4, impl=impl).tolist() == [1, 2, 4, 5]
    assert score.score_and_select(*cols, pinned, 100, impl=impl).tolist() == [1, 2, 4, 5, 7, 8]
    assert score.score_and_select(*cols, torch.ones(n, dtype=torch.bool), 3, impl=impl).numel() == 0


def test_integer_and_mixed_columns(impl):
    tokens = torch.tensor([100, 50_000, 3_000], dtype=torch.int64)
    rest = [torch.tensor(v, dtype=torch.float32) for v in ([2048.0] * 3, [0.0, 1.0, 30.0], [2.0, 2.0, 2.0],
                                                          [1.0, 2.0, 1.0], [0.0, 4.0, 1.0])]
    ref = score.retention_values(tokens, *rest, impl="torch")
    torch.testing.assert_close(score.retention_values(tokens, *rest, impl=impl), ref, rtol=RTOL, atol=0.0)


def test_bad_input_is_a_value_error(impl):
    cols = candidates(8, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        score.score_and_select(*cols, None, -1, impl=impl)
    with pytest.raises(ValueError, match="one length"):
        score.score_and_select(cols[0][:5], *cols[1:], None, 2, impl=impl)
    with pytest.raises(ValueError, match="pinned"):
        score.score_and_select(*cols, torch.zeros(3, dtype=torch.bool), 2, impl=impl)


def test_dispatch_defaults_and_explicit_choices():
    from kvsched.ops import backends

    chosen = score.SCORE_AND_SELECT.resolve("cpu", torch.float64)
    assert chosen.name == ("cxx" if backends.has_cxx() else "torch")  # Triton is never the CPU default
    assert score.SCORE_AND_SELECT.resolve("cpu", torch.float64, impl="torch").name == "torch"
    with pytest.raises(ValueError, match="unknown implementation"):
        score.SCORE_AND_SELECT.resolve("cpu", torch.float64, impl="cuda-magic")
    with pytest.raises(ValueError, match="does not support"):
        score.SCORE_AND_SELECT.resolve("meta", torch.float64, impl="cxx")


def test_select_candidates_gives_the_policy_cores_order(impl):
    """The vLLM adapter's release order (kernels) equals the pure policy core's on the same candidates."""
    import random

    from kvsched.ops.score import select_candidates

    rng = random.Random(5)
    for n in (0, 1, 7, 300):
        cands = [Candidate(tokens=rng.choice([0, 16, 512, 30_000]), bytes_per_token=rng.choice([1.0, 65536.0]),
                           idle_s=rng.uniform(0, 60), next_use_s=rng.uniform(0, 10),
                           role_weight=rng.choice([1.0, 2.0]), reuse_count=rng.randint(0, 5),
                           pinned=rng.random() < 0.2) for _ in range(n)]
        assert select_candidates(cands, n, impl=impl) == select_lowest(cands, n)


def test_a_nan_value_sorts_last_in_the_policy_core_as_in_the_kernels(impl):
    """Found by review: one NaN value (0 tokens at an infinite size) made the policy core's sort misorder the whole
    list, so the order below 4,096 candidates differed from the kernels' above."""
    cands = [Candidate(tokens=t, bytes_per_token=b, idle_s=1.0, next_use_s=2.0, role_weight=1.0, reuse_count=0)
             for t, b in ((900, 4096.0), (0, math.inf), (901, 4096.0), (400, 4096.0))]
    assert math.isnan(retention_value(cands[1]))
    assert select_lowest(cands, 4)[-1] == 1 and select_candidates_of(cands, impl) == select_lowest(cands, 4)


@pytest.mark.parametrize("idle_s, next_use_s", [(math.inf, 1e308), (math.inf, 5.0), (5.0, math.inf),
                                                (1e308, -1e308), (math.nan, 1.0), (math.inf, math.inf)])
def test_the_policy_cores_value_agrees_with_the_kernels_on_extreme_times(impl, idle_s, next_use_s):
    """Found by review: with idle_s = inf and next_use_s > ~9e307, idle_s - 2 * next_use_s is inf - inf = NaN; the
    policy core skipped exp (NaN > 0 is false) and gave a number where the kernels give NaN."""
    fields = (100.0, 1.0, idle_s, next_use_s, 1.0, 0)  # reuse_count an int, as every caller passes it
    want = value_of(*fields)
    got = score.retention_values(*(torch.tensor([v], dtype=torch.float64) for v in fields), impl=impl).item()
    assert got == want or (math.isnan(got) and math.isnan(want)), (got, want)


def select_candidates_of(cands, impl):
    return score.select_candidates(cands, len(cands), impl=impl)


def test_columns_that_are_not_real_vectors_are_a_value_error(impl):
    cols = candidates(8, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        score.score_and_select(*(c[0] for c in cols), None, 1, impl=impl)  # 0-d: an IndexError before
    with pytest.raises(ValueError, match="real numbers"):
        score.score_and_select(cols[0].to(torch.complex64), *cols[1:], None, 1, impl=impl)


def test_the_cxx_selection_scans_every_candidate_when_openmp_gives_a_smaller_team():
    """Found by review: the C++ selection split the candidates by the threads it asked for; with fewer in the team
    (OMP_THREAD_LIMIT, OMP_DYNAMIC, a nested region) the missing threads' slices were never scanned."""
    import subprocess
    import sys

    from tests.ops.conftest import require_cxx

    require_cxx()
    code = ("import torch; from kvsched.ops import score\n"
            "g = torch.Generator().manual_seed(0); n = 100_000\n"
            "cols = [torch.rand(n, generator=g, dtype=torch.float64) * 100 + 1 for _ in range(6)]\n"
            "ref = score.score_and_select(*cols, None, 10, impl='torch').tolist()\n"
            "assert score.score_and_select(*cols, None, 10, impl='cxx').tolist() == ref\n"
            "assert score.score_and_select(*cols, None, n, impl='cxx').numel() == n\n")
    env = {**__import__("os").environ, "OMP_THREAD_LIMIT": "1", "OMP_NUM_THREADS": "4"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
