"""`kvsched bench kernels`: the done-when gates read the largest C++ rows (no timing here)."""

from kvsched.bench.kernels import gates


def row(op, impl, n, speedup, bw, isa=None):
    return {"op": op, "impl": impl, "isa": isa, "n": n, "speedup_vs_torch": speedup, "bw_fraction": bw}


def test_gates_use_the_largest_size_of_each_vector_path():
    q = "quantize_kv_fp8 (gather)"
    rows = [row(q, "cxx", 8192, 40.0, 0.6, "avx512"), row(q, "cxx", 32768, 1.5, 0.3, "avx512"),
            row(q, "cxx", 8192, 1.0, 0.1, "avx2"), row(q, "cxx", 32768, 25.0, 0.55, "avx2"),
            row(q, "cxx", 32768, 7.0, 0.07, "scalar"),  # the reference path has no gate
            row(q, "torch", 32768, 1.0, 0.01),
            row("score_and_select", "cxx", 1_000_000, 2.5, 0.2)]
    assert gates(rows) == {"cxx_avx512_fp8_quantize_bw_fraction_ge_0.5": False,
                           "cxx_avx512_fp8_quantize_speedup_ge_20x": False,
                           "cxx_avx2_fp8_quantize_bw_fraction_ge_0.5": True,
                           "cxx_avx2_fp8_quantize_speedup_ge_20x": True,
                           "cxx_score_and_select_1M_speedup_ge_2x": True}


def test_no_cxx_rows_no_gates():
    assert gates([row("score_and_select", "torch", 1_000_000, 1.0, 0.02)]) == {}


def test_the_fp8_rows_time_and_bandwidth_fraction_come_from_the_same_samples(monkeypatch):
    """Found by review: median_s came from median_time's samples and bw_fraction_paired from a second, later set; on
    a machine whose load changes between them the two disagree. A fake clock: the op slows down after its first calls,
    the copy runs at 10 GB/s throughout."""
    import statistics
    from types import SimpleNamespace

    from kvsched.bench import kernels

    now = [0.0]
    durations = iter([0.5, 0.5] + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0] * 10)  # warm-up calls, then the samples

    def op():
        now[0] += next(durations)

    class Copy:
        def sample_gbps(self):
            return 10.0

    monkeypatch.setattr(kernels, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    median_s, fraction = kernels.paired_samples(op, 40 * 10**9, Copy(), pairs=7)
    assert median_s == 4.0  # the median of the 7 timed calls (min_time_s below one call: one call a sample)
    assert fraction == statistics.median([40 / t / 10.0 for t in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)]) == 1.0
    timers = []
    monkeypatch.setattr(kernels, "paired_samples", lambda fn, nbytes, ref, pairs: timers.append(pairs) or (1.0, 0.5))
    monkeypatch.setattr(kernels, "CopyReference", lambda: None)
    rows = kernels.bench_fp8((256,), ["torch"], repeats=3, isas=[])
    assert timers == [7, 7] and all(r["median_s"] == 1.0 and r["bw_fraction_paired"] == 0.5 for r in rows)
