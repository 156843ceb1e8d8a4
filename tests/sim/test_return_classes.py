"""Return classes (kvsched.sim.return_classes): the engine-visible buckets, the hindsight return labels and rates, and
the AUC, on hand-built arrays whose answers are worked out in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from kvsched.sim import return_classes as rc
from kvsched.sim.return_classes import auc, class_rates, classify, gap_after, turn_index

NAN = float("nan")


def test_turn_index_and_gap_follow_each_session_in_arrival_order():
    session = np.array([0, 1, 0, 0, 1, 0, 0])
    t = np.array([0.0, 1.0, 10.0, 50.0, 300.0, 1000.0, 1001.0])
    assert turn_index(session).tolist() == [1, 1, 2, 3, 2, 4, 5]
    np.testing.assert_array_equal(rc.previous_gap_s(session, t), [NAN, NAN, 10.0, 40.0, 299.0, 950.0, 1.0])


def test_gap_buckets_are_first_then_under_30_120_600_then_more():
    gaps = np.array([NAN, 0.0, 29.9, 30.0, 119.0, 120.0, 599.0, 600.0, 1e4])
    assert rc.gap_bucket(gaps).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_length_buckets_are_octaves_with_zero_apart():
    assert rc.log2_bucket(np.array([0, 1, 2, 3, 4, 1023, 1024])).tolist() == [-1, 0, 1, 1, 2, 9, 10]


def test_classes_group_turns_that_look_alike_and_label_them():
    # s0: a first turn of 8 blocks, a second 40 s later; s1: the same first turn; s2: a first turn of 1 block, then
    # turns 2..5 within 30 s of each other (turns 4 and 5 share "turn 4+").
    session = np.array([0, 1, 2, 0, 2, 2, 2, 2])
    t = np.array([0.0, 0.0, 0.0, 40.0, 5.0, 10.0, 15.0, 20.0])
    order = np.argsort(t, kind="stable")
    prompt = np.array([8, 8, 1, 9, 2, 3, 3, 3])[order]
    out = np.array([100, 100, 5, 100, 5, 5, 5, 5])[order]
    cls, labels = classify(session[order], t[order], prompt, out)
    by_request = {(int(s), int(k)): labels[c] for s, k, c in zip(session[order], turn_index(session[order]), cls,
                                                                  strict=True)}
    assert by_request[(0, 1)] == by_request[(1, 1)] == "turn 1 | prompt 2^3 | output 2^6 | first"
    assert by_request[(0, 2)] == "turn 2 | prompt 2^3 | output 2^6 | gap<120s"
    assert by_request[(2, 4)] == by_request[(2, 5)] == "turn 4+ | prompt 2^1 | output 2^2 | gap<30s"
    assert len(labels) == 6  # s0+s1 first turns, s2 turns 1, 2, 3, 4+ and s0 turn 2
    one, one_labels = classify(session[order], t[order], prompt, out, ("turn",))
    assert one_labels == ["turn 1", "turn 2", "turn 3", "turn 4+"] and one.max() == 3
    with pytest.raises(ValueError, match="unknown"):
        classify(session, t, prompt, out, ("turn", "role"))


def test_a_return_counts_when_the_next_turn_comes_within_the_ttl_of_this_turns_end():
    # s0 at 0 (ends 10), back at 610 (600 s after its end: in), ends 620, back at 1300 (680 s: out); s1 one turn.
    session = np.array([0, 1, 0, 0])
    t = np.array([0.0, 5.0, 610.0, 1300.0])
    finish = t + np.array([10.0, 1.0, 10.0, 1.0])
    assert (gap_after(session, t, finish) <= 600.0).tolist() == [True, False, False, False]
    assert (gap_after(session, t, finish) <= 700.0).tolist() == [True, False, True, False]


def test_gap_after_is_the_time_from_a_turns_end_to_its_sessions_next_arrival():
    session = np.array([0, 1, 0, 0])
    t = np.array([0.0, 5.0, 610.0, 612.0])
    finish = t + np.array([10.0, 1.0, 10.0, 1.0])
    gap = rc.gap_after(session, t, finish)
    assert gap[0] == 600.0 and gap[2] == -8.0  # the third arrived while the second ran
    assert np.isinf(gap[1]) and np.isinf(gap[3])


def test_class_ttls_time_each_class_by_what_its_returns_earn_against_the_block_seconds_they_hold():
    # class 0: two turns of 4 blocks back after 20 s and 200 s; class 1: never back; class 2: back while it ran.
    cls = np.array([0, 0, 1, 2])
    gap = np.array([20.0, 200.0, np.inf, -3.0])
    blocks = np.array([4, 4, 10, 5])
    # price 0.001: T=300 catches 8 blocks for 4 x 20 + 4 x 200 = 880 block-seconds (8 - 0.88 = 7.12), T=30 catches 4
    # for 4 x 20 + 4 x 30 = 200 (4 - 0.2): 300 s. Price 0.02: 8 - 17.6 < 0 and 4 - 4 = 0: T=30 is not better than none,
    # T=15 catches nothing: no pin. A class that never returns and one whose turns overlap get none at any price.
    assert rc.class_ttls(cls, 3, gap, blocks, 0.001).tolist() == [300.0, 0.0, 0.0]
    assert rc.class_ttls(cls, 3, gap, blocks, 0.01).tolist() == [30.0, 0.0, 0.0]  # 4 - 2 = 2 > 8 - 8.8
    assert rc.class_ttls(cls, 3, gap, blocks, 0.02).tolist() == [0.0, 0.0, 0.0]
    assert rc.class_ttls(cls, 3, gap, blocks, 0.0).tolist() == [300.0, 0.0, 0.0]  # free: the shortest that catches all


def test_shrinkage_pulls_a_class_seen_rarely_toward_its_parent():
    cls, parent_of = np.array([0, 1, 1]), np.array([0, 0])
    gap, blocks = np.array([np.inf, 20.0, 20.0]), np.array([4, 4, 4])
    assert rc.class_ttls(cls, 2, gap, blocks, 0.001, parent_of=parent_of).tolist() == [0.0, 30.0]
    # 10 pseudo-turns of 4 blocks at the parent's averages (2/3 of its blocks back within 30 s, 70/3 s held at 30):
    # class 0's one turn that never came back now reads like its parent
    assert rc.class_ttls(cls, 2, gap, blocks, 0.001, parent_of=parent_of, strength=10.0).tolist() == [30.0, 30.0]
    returned = np.array([True, False, True])
    assert rc.shrunk_rates(np.array([0, 0, 1]), 2, returned).tolist() == [0.5, 1.0]
    assert np.allclose(rc.shrunk_rates(np.array([0, 0, 1]), 3, returned, np.array([0, 0, 0]), 2.0),
                       [(1 + 2 * 2 / 3) / 4, (1 + 2 * 2 / 3) / 3, 2 / 3])  # class 2, never seen: its parent's rate
    assert rc.session_folds(np.array([0, 1, 2, 3, 0])).tolist() == [False, True, False, True, False]


def test_hindsight_rates_are_one_where_every_turn_returns_and_zero_where_none_does():
    cls = np.array([0, 1, 0, 2, 1, 0, 2])
    returned = np.array([True, False, True, True, False, True, False])
    r = class_rates(cls, ["always", "never", "half"], returned)
    assert r.turns.tolist() == [3, 2, 2] and r.returns.tolist() == [3, 0, 1]
    assert r.rate.tolist() == [1.0, 0.0, 0.5]
    assert [row["class"] for row in r.table()] == ["always", "never", "half"]
    assert rc.pinned_classes(r.rate, 0.5).tolist() == [True, False, True]
    assert rc.pinned_classes(r.rate, 0.75).tolist() == [True, False, False]
    assert rc.pinned_classes(r.rate, 0.0).all()


def test_auc_on_known_cases():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75  # 3 of 4 (pos, neg) pairs ordered
    assert auc(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == 1.0
    assert auc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == 0.0
    assert auc(np.array([1.0, 1.0, 2.0]), np.array([0, 1, 1])) == 0.75  # one tie (half) + one ordered pair
    assert auc(np.full(6, 0.3), np.array([0, 1, 0, 1, 1, 0])) == 0.5
    assert auc(np.array([0.2, 0.9]), np.array([1, 1])) is None
