from kvsched.core.scoring import Candidate, recompute_cost_s, retention_value, select_lowest


def test_cost_grows_superlinearly():
    assert recompute_cost_s(20_000) > 2 * recompute_cost_s(10_000)


def test_value_orders_by_size_reuse_and_wait():
    base = Candidate(tokens=2000, bytes_per_token=65536.0, idle_s=0.0, next_use_s=5.0)
    assert retention_value(Candidate(30_000, 65536.0, 0.0, 1.0)) > retention_value(base)
    assert retention_value(Candidate(2000, 65536.0, 0.0, 5.0, reuse_count=5)) > retention_value(base)
    assert retention_value(Candidate(2000, 65536.0, 0.0, 5.0, role_weight=2.0)) == 2 * retention_value(base)
    overdue = Candidate(2000, 65536.0, idle_s=60.0, next_use_s=5.0)
    assert retention_value(overdue) < retention_value(base) / 100
    assert retention_value(Candidate(0, 65536.0, 0.0, 5.0)) == 0.0


def test_select_lowest_skips_pinned_and_breaks_ties_by_index():
    same = Candidate(100, 1.0, 0.0, 1.0)
    cands = [same, Candidate(100, 1.0, 0.0, 1.0, pinned=True), same, Candidate(1, 1.0, 100.0, 1.0)]
    assert select_lowest(cands, 10) == [3, 0, 2]
    assert select_lowest(cands, 1) == [3]
    assert select_lowest(cands, 0) == []
