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
