"""The fleet's TTFT quantile from its replicas' cumulative histograms: Prometheus's interpolation, window increases
with counter resets, the merge across replicas and when it is refused."""

from __future__ import annotations

import math

import pytest

from kvsched.core.routing_autoscale import AutoscaleTargets, ReplicaLoad, desired_replicas
from kvsched.core.ttft_histogram import (
    ServerCounts,
    add_counts,
    bucket_bound,
    bucket_key,
    counter_increase,
    fleet_quantile,
    histogram_quantile,
    merge,
    window_increase,
)

INF = math.inf
BOUNDS = (0.1, 0.5, 1.0, 2.5, 5.0, INF)


def hist(per_bucket: dict[float, float]) -> dict[float, float]:
    """Cumulative counts from counts per bucket (the bucket named by its upper bound)."""
    out, total = {}, 0.0
    for b in BOUNDS:
        total += per_bucket.get(b, 0.0)
        out[b] = total
    return out


def test_quantile_interpolates_inside_its_bucket_as_prometheus_does() -> None:
    h = {0.1: 50.0, 0.5: 90.0, 1.0: 100.0, INF: 100.0}
    assert histogram_quantile(h, 0.95) == pytest.approx(0.75)  # rank 95 of 100: half way through (0.5, 1.0]
    assert histogram_quantile(h, 0.25) == pytest.approx(0.05)  # the first bucket starts at 0
    assert histogram_quantile({0.1: 10.0, 1.0: 10.0, INF: 100.0}, 0.5) == 1.0  # in +Inf: the highest finite bound
    assert histogram_quantile({-1.0: 5.0, 0.0: 5.0, INF: 5.0}, 0.5) == -1.0  # a first bound <= 0 is returned as is
    assert histogram_quantile({0.1: 60.0, 0.5: 50.0, INF: 100.0}, 0.5) == pytest.approx(50 / 60 * 0.1)  # monotonic


@pytest.mark.parametrize("h", [{0.1: 0.0, INF: 0.0}, {}, {0.1: 5.0, 1.0: 9.0}, {INF: 9.0}])
def test_no_observations_or_no_inf_bucket_is_no_quantile_rather_than_0_or_inf(h: dict[float, float]) -> None:
    assert histogram_quantile(h, 0.95) is None


def test_bucket_keys_round_trip_including_inf() -> None:
    for b in (0.001, 0.25, 2560.0, INF):
        assert bucket_bound(bucket_key(b)) == b
    assert bucket_key(INF) == "ttft_le:+Inf"
    assert bucket_bound("queue_depth") is None and bucket_bound("ttft_le:x") is None
    assert bucket_bound("ttft_le:nan") is None


def test_a_window_counts_only_what_was_added_in_it() -> None:
    old = hist({5.0: 1000})  # slow traffic before the window: it ages out
    assert window_increase([old, hist({5.0: 1000, 0.1: 40}), hist({5.0: 1000, 0.1: 90})]) == hist({0.1: 90})
    assert window_increase([old]) == dict.fromkeys(BOUNDS, 0.0)  # one scrape: an empty window
    assert window_increase([]) is None


def test_a_restarted_replica_counts_from_zero_again() -> None:
    """Counts going down: the server's counters started over; what it shows after the restart is all new (as
    Prometheus's increase() takes a reset), never a negative increase."""
    before, after, later = hist({0.1: 100, 5.0: 20}), hist({0.1: 5, 5.0: 1}), hist({0.1: 8, 5.0: 2})
    assert window_increase([before, after, later]) == hist({0.1: 8, 5.0: 2})
    assert window_increase([hist({0.1: 10}), before, after]) == hist({0.1: 95, 5.0: 21})  # 90+20 then 5+1


def test_a_drop_between_two_scrapes_is_a_counter_reset() -> None:
    """One server's consecutive scrapes: a difference; a drop in any bucket (the counters started over) makes all the
    new counts new, also a bucket that grew past its old value; other bounds (a restart with other buckets) too."""
    before = hist({0.1: 30})
    assert counter_increase(before, hist({0.1: 35, 5.0: 2})) == hist({0.1: 5, 5.0: 2})
    assert counter_increase(before, hist({0.1: 5, 5.0: 45})) == hist({0.1: 5, 5.0: 45})  # +Inf 50 > 30: still new
    assert counter_increase(before, {0.2: 3.0, INF: 3.0}) == {0.2: 3.0, INF: 3.0}
    assert counter_increase({}, before) == before  # the first scrape: all of it
    total = add_counts(add_counts({}, before), counter_increase(before, hist({5.0: 4})))
    assert total == hist({0.1: 30, 5.0: 4})  # a running total that never starts over
    assert add_counts(total, {0.2: 3.0, INF: 3.0}) == {0.2: 3.0, INF: 3.0}  # other bounds: it starts over


def test_a_bucket_layout_changing_in_the_window_or_a_broken_count_cannot_be_differenced() -> None:
    assert window_increase([hist({0.1: 1}), {0.2: 1.0, INF: 1.0}]) is None
    assert window_increase([hist({0.1: 1}), {**hist({0.1: 2}), INF: math.nan}]) is None


def timed(*scrapes: dict[float, float], every_s: float = 10.0) -> list[tuple[float, dict[float, float]]]:
    return [(i * every_s, h) for i, h in enumerate(scrapes)]


def eight_replicas_one_slow() -> dict[str, list[tuple[float, dict[float, float]]]]:
    """Eight replicas, 100 first tokens each in the window; one of them slow on 10 of its 100 (5 s)."""
    start = hist({})
    fast = timed(start, hist({0.1: 100}))
    slow = timed(start, hist({0.1: 90, 5.0: 10}))
    return {**{f"r{i}": fast for i in range(7)}, "r7": slow}


def test_the_fleets_p95_is_its_merged_histograms_not_its_slowest_replicas() -> None:
    windows = eight_replicas_one_slow()
    slowest = max(histogram_quantile(s[-1][1], 0.95) or 0.0 for s in windows.values())
    assert slowest == pytest.approx(3.75)  # r7's own: rank 95 of 100, half way through (2.5, 5.0]
    fleet = fleet_quantile(windows, 0.95, min_samples=20)
    assert fleet.merged and fleet.samples == 800 and fleet.replicas == 8
    assert fleet.value == pytest.approx(0.1 * 760 / 790)  # rank 760 of 800: 790 fast ones under 0.1 s


def test_eight_replicas_one_slow_the_old_rule_scales_up_the_fleet_rule_does_not() -> None:
    windows = eight_replicas_one_slow()
    targets = AutoscaleTargets(min_replicas=1, max_replicas=16, queue_per_replica=4.0, ttft_p95_s=2.0)
    loads = [ReplicaLoad(2.5, histogram_quantile(s[-1][1], 0.95)) for s in windows.values()]  # queues well within
    old = desired_replicas(8, loads, targets, now_s=0.0, last_change_s=None)
    assert old.replicas == 15 and "ttft" in old.reason  # 3.75 s / 2 s: a scale-up the fleet does not need
    fleet = fleet_quantile(windows, 0.95, min_samples=20).value
    new = desired_replicas(8, [ReplicaLoad(2.5, None)] * 8, targets, now_s=0.0, last_change_s=None,
                           fleet_ttft_p95_s=fleet)
    assert new.replicas == 8 and new.reason == "steady"
    # the fleet value replaces the replicas' own even when they are given
    assert desired_replicas(8, loads, targets, 0.0, None, fleet_ttft_p95_s=fleet).replicas == 8
    # and when the fleet is slow, it scales up on it
    assert desired_replicas(8, loads, targets, 0.0, None, fleet_ttft_p95_s=5.0).replicas == 16


def test_different_bucket_bounds_are_not_merged_and_say_so() -> None:
    windows = {"a": timed(hist({}), hist({0.1: 50})), "b": timed({0.2: 0.0, INF: 0.0}, {0.2: 50.0, INF: 50.0})}
    fleet = fleet_quantile(windows, 0.95)
    assert not fleet.merged and fleet.value is None and "bounds differ" in fleet.note
    changed = fleet_quantile({"a": timed(hist({}), {0.2: 1.0, INF: 1.0})}, 0.95)
    assert not changed.merged and "changed" in changed.note
    assert not fleet_quantile({}, 0.95).merged  # no replica reported buckets
    no_inf = fleet_quantile({"a": timed({0.1: 0.0}, {0.1: 50.0})}, 0.95)
    assert not no_inf.merged and "+Inf" in no_inf.note


def test_an_empty_or_thin_window_is_no_signal() -> None:
    quiet = fleet_quantile({"a": timed(hist({5.0: 900}), hist({5.0: 900})), "b": timed(hist({}), hist({}))}, 0.95, 20)
    assert quiet.merged and quiet.value is None and quiet.samples == 0  # old slow traffic only: aged out
    thin = fleet_quantile({"a": timed(hist({}), hist({5.0: 19}))}, 0.95, min_samples=20)
    assert thin.merged and thin.value is None and thin.samples == 19
    enough = fleet_quantile({"a": timed(hist({}), hist({5.0: 19})), "b": timed(hist({}), hist({0.1: 1}))}, 0.95, 20)
    assert enough.value == pytest.approx(2.5 + 2.5 * (19 - 1) / 19)  # 19 slow and 1 fast, merged: 20


def test_replicas_weigh_by_their_rate_of_first_tokens_not_the_length_of_their_window() -> None:
    """Found on a real Ray cluster: each replica's points span its own stretch of time (its clock, its pushes). One
    slow first token a second on one replica and 100 fast ones on another are 1% slow, whatever spans their windows
    cover; counts alone put the slow replica's 30 s window (30 slow) against the fast one's 2 s (200 fast): 13% slow,
    a P95 of 5 s."""
    slow = [(0.0, hist({})), (30.0, hist({5.0: 30}))]
    fast = [(28.0, hist({})), (30.0, hist({0.1: 200}))]
    fleet = fleet_quantile({"s": slow, "f": fast}, 0.95)
    assert fleet.replicas == 2 and fleet.samples == 230
    assert fleet.value == pytest.approx(0.1 * 0.95 * 101 / 100)  # 101/s: 100 of them under 0.1 s
    assert histogram_quantile(merge([slow[1][1], fast[1][1]]), 0.95) > 4.0  # what the counts alone said


def test_no_fleet_value_while_a_replica_has_no_window_yet() -> None:
    """Found on a real Ray cluster: at start, the slow replica had two scrapes in the window and the fast one one;
    its P95 alone (3.75 s) read as the fleet's and scaled the pool up. A replica with one scrape (just started, or
    its points not pushed yet) has no window: no fleet value until it has one."""
    slow = timed(hist({}), hist({0.1: 90, 5.0: 10}))
    fleet = fleet_quantile({"s": slow, "f": timed(hist({0.1: 300}))}, 0.95)
    assert fleet.merged and fleet.value is None and fleet.replicas == 1 and "f has no window" in fleet.note
    assert fleet_quantile({"s": slow, "f": timed(hist({0.1: 300}), hist({0.1: 600}))}, 0.95).value < 0.1


E0, E1 = (("engine", "0"), ("model_name", "m")), (("engine", "1"), ("model_name", "m"))


def test_a_servers_first_scrape_is_a_baseline_only() -> None:
    """rate() needs two samples: what the server counted before its first scrape is not new (an engine that served
    for hours before a replica joined the fleet)."""
    counts = ServerCounts()
    assert counts.add({}, 0.0) == {} and counts.total == {}  # nothing to start from yet
    assert counts.add({E0: hist({5.0: 1000})}, 1.0) == hist({}) and counts.total == hist({})
    assert counts.add({E0: hist({5.0: 1000, 0.1: 30})}, 2.0) == hist({0.1: 30})
    assert counts.total == hist({0.1: 30})


def test_each_engines_series_resets_on_its_own() -> None:
    """Engine 1 restarting (its counts drop) is its reset alone: engine 0's 1000 slow first tokens of long ago are
    not new. Summed first, the drop read as the server's reset and all 1030 counted."""
    counts = ServerCounts()
    counts.add({E0: hist({5.0: 1000}), E1: hist({0.1: 1000})}, 0.0)
    assert counts.add({E0: hist({5.0: 1000, 0.1: 20}), E1: hist({0.1: 10})}, 1.0) == hist({0.1: 30})
    assert counts.total == hist({0.1: 30})


def test_a_series_new_after_the_baseline_is_its_own_baseline_and_a_missing_one_is_not_counted_twice() -> None:
    """A series first seen after the server's first scrape (an engine added, or one the scrapes before missed) counts
    from its second scrape, as rate() does each series: before, it counted in full, so an engine missing from the
    first scrapes with 1000 slow first tokens of long ago read as 1000 slow ones in one scrape (a P95 of 5 s)."""
    counts = ServerCounts(hold_s=60.0)
    counts.add({E0: hist({0.1: 100})}, 0.0)
    assert counts.add({E0: hist({0.1: 100}), E1: hist({0.1: 5})}, 1.0) == hist({})  # an engine added: its baseline
    assert counts.add({E0: hist({0.1: 110})}, 2.0) == hist({0.1: 10})  # engine 1 missing from this scrape
    assert counts.add({E0: hist({0.1: 110}), E1: hist({0.1: 8})}, 3.0) == hist({0.1: 3})  # back: since its last
    lacking = {b: c for b, c in hist({0.1: 120}).items() if b != 1.0}
    assert counts.add({E0: lacking, E1: hist({0.1: 9})}, 4.0) == hist({0.1: 1})  # engine 0 lacks a bucket: skipped
    assert counts.add({E0: hist({0.1: 130}), E1: hist({0.1: 9})}, 5.0) == hist({0.1: 20})
    assert counts.total == hist({0.1: 34})
    late = ServerCounts()
    late.add({E0: hist({0.1: 100})}, 0.0)
    assert late.add({E0: hist({0.1: 120}), E1: hist({5.0: 1000})}, 1.0) == hist({0.1: 20})  # its history: not new
    assert late.add({E0: hist({0.1: 120}), E1: hist({5.0: 1000, 0.1: 7})}, 2.0) == hist({0.1: 7})
    assert histogram_quantile(late.total, 0.95) < 0.1


def without(h: dict[float, float], bound: float) -> dict[float, float]:
    """A scrape of `h` missing one bucket (an incomplete scrape)."""
    return {b: c for b, c in h.items() if b != bound}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0])
def test_a_series_with_a_broken_count_is_skipped_not_kept(bad: float) -> None:
    """Found by review: a NaN count was kept as the series' last counts and added to the running total, which stayed
    NaN for good (NaN - x, and no reset is ever below NaN), so Ray's windows of that replica were never mergeable; a
    negative one read as a reset, counting the engine's 100 first tokens of before the baseline as new, and lowered
    the total Ray differences. Such a series is skipped, as an incomplete scrape is."""
    counts = ServerCounts()
    counts.add({E0: hist({0.1: 100})}, 0.0)
    broken = {**hist({0.1: 105}), 5.0: bad}
    assert counts.add({E0: broken}, 1.0) == {}
    assert counts.total == hist({})
    assert counts.add({E0: hist({0.1: 110})}, 2.0) == hist({0.1: 10})
    assert counts.total == hist({0.1: 10})
    assert counts.add({E0: {**hist({0.1: 120}), math.nan: 120.0}}, 3.0) == {}  # a bound that is no number
    assert counts.total == hist({0.1: 10})
    fresh = ServerCounts()  # a broken first scrape is no baseline either
    assert fresh.add({E0: broken}, 0.0) == {} and fresh.total == {}
    assert fresh.add({E0: hist({0.1: 110})}, 1.0) == hist({}) and fresh.total == hist({})
    two = ServerCounts()  # one engine broken at the baseline: its history is not new when it is countable
    two.add({E0: hist({0.1: 100}), E1: broken}, 0.0)
    assert two.add({E0: hist({0.1: 110}), E1: hist({5.0: 500})}, 1.0) == hist({0.1: 10})
    assert two.add({E0: hist({0.1: 110}), E1: hist({5.0: 500, 0.1: 5})}, 2.0) == hist({0.1: 5})


def test_an_incomplete_first_scrape_is_no_door_for_the_engines_history() -> None:
    """Found by review: a baseline scrape missing a bucket, then a complete one, read as a restart with other bounds
    (a bound added), so the engine's 500 first tokens of before the baseline counted as new: the bug the baseline
    fixed, by another door. No count dropped, so no restart: the complete scrape is the series' new baseline."""
    counts = ServerCounts()
    counts.add({E0: without(hist({5.0: 500}), 1.0)}, 0.0)
    assert counts.add({E0: hist({5.0: 500, 0.1: 30})}, 10.0) == {}
    assert counts.total.get(INF) == 0.0
    assert counts.add({E0: hist({5.0: 500, 0.1: 60})}, 20.0) == hist({0.1: 30})
    assert counts.total == hist({0.1: 30})


def test_a_bucket_missing_past_hold_s_is_differenced_over_the_buckets_left() -> None:
    """Found by review: a series lacking a bucket for longer than `hold_s` was taken as restarted with other bounds,
    so all its counts were new: the 40 slow first tokens counted at the last complete scrape counted again (70, not
    the 30 fast ones since). No count dropped, so no restart: the buckets it still has are differenced."""
    counts = ServerCounts(hold_s=60.0)
    counts.add({E0: hist({})}, 0.0)
    assert counts.add({E0: hist({5.0: 40})}, 10.0) == hist({5.0: 40})
    partial = without(hist({0.1: 30, 5.0: 40}), 1.0)
    assert counts.add({E0: partial}, 20.0) == {}  # skipped while it may be a passing glitch
    assert counts.add({E0: partial}, 50.0) == {}
    assert counts.add({E0: partial}, 80.0) == without(hist({0.1: 30}), 1.0)  # the layout now
    assert counts.total == without(hist({0.1: 30}), 1.0)  # the total starts over on the new bounds
    assert counts.add({E0: without(hist({0.1: 35, 5.0: 40}), 1.0)}, 90.0) == without(hist({0.1: 5}), 1.0)


def test_a_series_not_scraped_for_longer_than_hold_s_starts_from_its_next_scrape() -> None:
    """Found by review: after a gap (the polls failed for minutes, the engine still serving), the next scrape's
    increase held every first token of the gap: 900 slow ones of minutes ago in one scrape, so in a 30 s fleet
    window, where the replica's rate and its P95 are the window's. rate() over a window never spans a longer gap:
    the scrape after one is the series' baseline."""
    counts = ServerCounts(hold_s=60.0)
    counts.add({E0: hist({})}, 0.0)
    assert counts.add({E0: hist({0.1: 30})}, 10.0) == hist({0.1: 30})
    assert counts.add({E0: hist({0.1: 30, 5.0: 900})}, 300.0) == {}  # the first scrape after a 290 s gap
    assert counts.add({E0: hist({0.1: 60, 5.0: 900})}, 310.0) == hist({0.1: 30})
    assert counts.total == hist({0.1: 60})
