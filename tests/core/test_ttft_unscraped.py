"""A live replica whose engine metrics go unread (its scrapes failing from its start, or for long since its last good
one) is not silently left out of the fleet's P95 TTFT: the P95 says it is the other replicas' only, names it, and the
pool is not scaled down meanwhile (kvsched.core.ttft_histogram, kvsched.core.routing_autoscale)."""

from __future__ import annotations

import math

from kvsched.core.routing_autoscale import ScaleDecision, held_while_unread
from kvsched.core.ttft_histogram import UNSCRAPED_GRACE_S, ScrapeHealth, fleet_quantile

INF = math.inf
FAST = {0.1: 100.0, 0.5: 100.0, INF: 100.0}


def windows(*names: str) -> dict[str, list[tuple[float, dict[float, float]]]]:
    """Each named replica: a baseline then 100 first tokens under 0.1 s, 10 s later."""
    return {r: [(0.0, dict.fromkeys(FAST, 0.0)), (10.0, dict(FAST))] for r in names}


def test_a_replica_never_read_is_dated_from_its_first_try_and_one_read_before_from_its_last_good_one() -> None:
    h = ScrapeHealth()
    assert h.unread_s(5.0) == 0.0 and h.state(5.0) == "not tried"
    h.record(False, 100.0)
    h.record(False, 130.0)
    assert h.unread_s(150.0) == 50.0 and h.state(150.0) == "failing"
    assert h.state(100.0 + UNSCRAPED_GRACE_S + 1) == "never read"
    h.record(True, 200.0)
    assert h.unread_s(500.0) == 0.0 and h.state(500.0) == "ok"  # read at its last try: current
    h.record(False, 510.0)
    assert h.unread_s(300.0 + UNSCRAPED_GRACE_S) == 100.0 + UNSCRAPED_GRACE_S and h.state(1000.0) == "stale"


def test_a_replica_unread_past_the_grace_is_named_and_the_p95_is_not_the_fleets() -> None:
    """Found by review: r2's metrics failed from its start, it reported no buckets, and the fleet's P95 was r0's and
    r1's alone, read as the pool's."""
    fleet = fleet_quantile(windows("r0", "r1"), 0.95, unread_s={"r0": 0.0, "r1": 0.0, "r2": UNSCRAPED_GRACE_S + 30})
    assert fleet.value is not None and fleet.value < 0.1 and fleet.replicas == 2 and fleet.merged
    assert not fleet.complete and fleet.unscraped == ("r2",)
    assert "engine metrics unread: r2 (90 s), left out: the P95 is the other replicas' only" in fleet.note
    read = fleet_quantile(windows("r0", "r1"), 0.95, unread_s={"r0": 0.0, "r1": 0.0})
    assert read.complete and read.value == fleet.value and "unread" not in read.note


def test_a_replica_unread_within_the_grace_with_no_buckets_yet_is_waited_for() -> None:
    fleet = fleet_quantile(windows("r0", "r1"), 0.95, unread_s={"r2": 20.0})
    assert fleet.value is None and fleet.merged and fleet.complete and "r2's engine metrics not read yet" in fleet.note


def test_a_replica_read_before_and_stale_past_the_grace_is_left_out_not_counted_as_idle() -> None:
    """Its last counts, reported again and again, would read as a replica with no first tokens in the window."""
    w = windows("r0")
    w["r1"] = [(0.0, dict(FAST)), (10.0, dict(FAST))]  # frozen since its last good read
    assert fleet_quantile(w, 0.95).replicas == 2
    stale = fleet_quantile(w, 0.95, unread_s={"r1": UNSCRAPED_GRACE_S + 1})
    assert stale.replicas == 1 and stale.unscraped == ("r1",) and stale.value is not None
    assert fleet_quantile(w, 0.95, unread_s={"r1": 5.0}).replicas == 2  # a failed poll or two: still counted


def test_every_replica_unread_is_no_signal_and_names_them() -> None:
    fleet = fleet_quantile({}, 0.95, unread_s={"r0": 100.0, "r1": 100.0, "r2": math.nan})
    assert fleet.value is None and fleet.unscraped == ("r0", "r1") and "no replica reported TTFT buckets" in fleet.note


def test_no_scale_down_while_a_replica_is_unread_but_a_scale_up_stands() -> None:
    down, up = ScaleDecision(2, "down: load at 0.10x target"), ScaleDecision(5, "up: p95 ttft at 1.50x target")
    held = held_while_unread(down, 3, ("r2",))
    assert held.replicas == 3 and held.reason.startswith("steady: no scale-down while replica(s) r2 cannot be read")
    assert held_while_unread(up, 3, ("r2",)) == up
    assert held_while_unread(down, 3, ()) == down
