"""tools/soak_ray_watch.py's judgement, on made-up answers: which replica each turn's answer names, a 5xx at a loss,
and a session's moves (failover off a lost replica, a move the router logged, anything else unexplained)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from soak_ray_watch import Placements, router_moves  # noqa: E402

SID = {"X-Session-Id": "wf0/worker-1", "Authorization": "Bearer k0"}


def answer(replica: str, status: int = 200, body: str = "{}") -> httpx.Response:
    return httpx.Response(status, text=body, headers={"x-kvsched-replica-id": replica, "x-kvsched-replica": replica,
                                                      "x-kvsched-attempts": "1"})


def test_a_5xx_is_the_losss_only_near_it_and_with_a_message() -> None:
    p = Placements()
    err = '{"error": {"message": "replica died", "type": "server_error"}}'
    assert p.observe({}, SID, answer("a", 503, err)) is False  # no loss yet: the soak's failure
    p.losses.append({"kind": "engine", "t": 0.0, "replica_id": "a"})
    assert p.observe({}, SID, answer("a", 503, "Internal Server Error")) is False  # no message
    assert p.observe({}, SID, answer("a", 503, err)) is True
    assert p.counts["status_503_at_loss"] == 1 and p.counts["status_503"] == 2


def test_moves_off_a_lost_replica_are_failovers_others_need_the_routers_reason(tmp_path: Path) -> None:
    p = Placements()
    for rid in ("a", "a", "b"):
        p.observe({}, SID, answer(rid))
    key = next(iter(p.turns))
    assert p.moves({})["counts"] == {"stayed": 1, "moved_unexplained": 1}
    (tmp_path / "replica_x_ingress_1.log").write_text(
        f"INFO kvsched router: session {key} moved slot-0 -> slot-1 (overflow, chosen slot-1, in flight {{}})\n")
    assert p.moves(router_moves(tmp_path))["counts"] == {"stayed": 1, "moved_overflow": 1}
    p.losses.append({"kind": "actor", "t": 0.0, "replica_id": "a"})
    assert p.moves({})["counts"] == {"stayed": 1, "moved_failover": 1}


def test_a_delete_answered_503_at_a_loss_is_no_failure_but_one_before_it_is() -> None:
    """The ingress answers a DELETE 503 (with a message: retry) when a replica failed to answer and none ended the
    session: seen in the Ray soak at its engine kill, a bad request's DELETE of an unknown session."""
    from soak_clients import Log, Target, delete

    err = '{"error": {"message": "1 engine replica(s) did not answer", "type": "server_error"}}'
    client = httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(503, text=err)))
    p, log = Placements(), Log()
    target = Target("ray", "http://ingress", "tiny", observe=p.observe)
    assert delete(client, target, log, "s") == 503 and len(log.failures) == 1
    p.losses.append({"kind": "engine", "t": 0.0, "replica_id": "a"})
    assert delete(client, target, log, "s") == 503 and len(log.failures) == 1
    assert p.counts["status_503_at_loss"] == 1


def test_the_killer_takes_no_replica_whose_engine_is_gone() -> None:
    """A listed engine_pid whose engine is gone (its replica not replaced yet) may be another process's number by
    now: not killed; the slot's replica with its engine running is, once listed. Found by review71: the first
    replica listed in the slot was SIGKILLed by that number whatever its engine's state."""
    import subprocess
    import threading
    from types import SimpleNamespace

    import pytest
    from soak_ray_watch import Killer

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    bystander = subprocess.Popen(sleep)  # holds the number a gone engine had
    engine = subprocess.Popen(sleep, start_new_session=True)  # a running engine, leading its group
    listings = [[{"slot": 0, "engine_pid": bystander.pid, "engine_alive": False, "replica_id": "gone"}]]
    listings.append(listings[0] + [{"slot": 0, "engine_pid": engine.pid, "engine_alive": True, "replica_id": "up"}])
    monitor = SimpleNamespace(live=lambda: listings.pop(0) if len(listings) > 1 else listings[0],
                              stop=threading.Event())
    placements = Placements()
    try:
        with pytest.raises(TimeoutError, match="no replacement"):  # (none comes here)
            Killer(monitor, placements, None, None, join_timeout_s=0).kill("engine", 0)  # type: ignore[arg-type]
        assert engine.wait(timeout=10) == -9 and bystander.poll() is None
        assert placements.losses[0]["replica_id"] == "up"
    finally:
        for p in (bystander, engine):
            p.kill()
            p.wait()


# ---- a failover's sessions find their KV in the shared store (soak_ray_watch.store_failovers) --------------------
def counters(moved: float, restored: float, blocks: float, up: float = 1.0) -> dict[str, float]:
    return {"kvsched_moved_sessions_total": moved, "kvsched_moved_sessions_restored_total": restored,
            "kvsched_shared_tier_restored_blocks_total": blocks, "kvsched_store_up": up}


def failed_over(to: str = "b") -> Placements:
    """Session s on replica a, a lost at t 1, its next turn on `to`."""
    from soak_ray_watch import Seen

    p = Placements()
    p.turns["s"] = [Seen(0.5, "a", "slot-0", 1), Seen(2.0, to, "slot-1", 1)]
    p.losses.append({"kind": "engine", "slot": 0, "t": 1.0, "replica_id": "a"})
    return p


def verdict_of(p: Placements, samples: list[tuple[float, str, dict[str, float]]]) -> dict[str, Any]:
    from soak_ray_watch import failovers, store_failovers

    (row,) = store_failovers(p.losses, failovers(p), samples, 10.0)
    return row


def test_a_failover_whose_sessions_read_their_kv_from_the_store_is_a_hit() -> None:
    before = [(0.9, "a", counters(0, 0, 0)), (0.9, "b", counters(3, 1, 4))]
    row = verdict_of(failed_over(), [*before, (3.0, "b", counters(4, 2, 9))])
    assert row["verdict"] == "hit" and row["to"] == ["b"] and row["sessions_moved"] == 1, row
    assert row["rise"] == {"moved_sessions": 1, "moved_sessions_restored": 1, "shared_tier_restored_blocks": 5}
    # blocks read alone (a moved session counted as moved at an earlier arrival) is a hit too
    assert verdict_of(failed_over(), [*before, (3.0, "b", counters(3, 1, 6))])["verdict"] == "hit"


def test_moved_sessions_whose_records_were_in_the_store_but_none_read_their_kv_is_a_miss() -> None:
    row = verdict_of(failed_over(), [(0.9, "a", counters(0, 0, 0)), (0.9, "b", counters(3, 1, 4)),
                                     (3.0, "b", counters(5, 1, 4))])
    assert row["verdict"] == "miss", row  # soak_ray fails the run on it


def test_kv_never_written_to_the_store_is_told_apart_from_a_miss() -> None:
    # no record of any moved session in the store: the lost engine wrote none
    assert verdict_of(failed_over(), [(0.9, "b", counters(3, 1, 4)), (3.0, "b", counters(3, 1, 4))])["verdict"] == \
        "not written"
    # the lost engine's store was down at its last sample: its turns' KV was not published
    row = verdict_of(failed_over(), [(0.9, "a", counters(0, 0, 0, up=0.0)), (0.9, "b", counters(3, 1, 4)),
                                     (3.0, "b", counters(5, 1, 4))])
    assert row["verdict"] == "not written" and row["lost_store_up"] == 0, row


def test_no_failover_or_no_sample_after_it_is_no_verdict_on_the_store() -> None:
    p = failed_over(to="a")  # the session came back to "a"'s id: no move
    assert verdict_of(p, [(0.9, "b", counters(3, 1, 4))])["verdict"] == "none moved"
    assert verdict_of(failed_over(), [(0.9, "b", counters(3, 1, 4))])["verdict"] == "unseen"


def test_only_the_window_up_to_the_next_loss_counts() -> None:
    from soak_ray_watch import failovers, store_failovers

    p = failed_over()
    p.losses.append({"kind": "actor", "slot": 1, "t": 2.5, "replica_id": "b"})
    samples = [(0.9, "b", counters(3, 1, 4)), (2.2, "b", counters(4, 1, 4)), (4.0, "b", counters(6, 3, 9))]
    first, second = store_failovers(p.losses, failovers(p), samples, 10.0)
    assert first["verdict"] == "miss" and second["verdict"] == "none moved", (first, second)


def test_the_store_counters_are_read_from_an_engines_metrics_page() -> None:
    from soak_ray_watch import store_counters

    page = ("# HELP kvsched_moved_sessions_total Sessions ...\n# TYPE kvsched_moved_sessions_total counter\n"
            "kvsched_moved_sessions_total 3.0\nkvsched_moved_sessions_restored_total 2.0\n"
            "kvsched_shared_tier_restored_blocks_total 17.0\nkvsched_store_up 1.0\nkvsched_store_upx 5\n"
            'vllm:num_requests_running{engine="0"} 1.0\n')
    assert store_counters(page) == counters(3, 2, 17)
