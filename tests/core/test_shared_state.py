"""Shared-store state (kvsched.core.shared_state), the store's outage backoff and where its reads run
(kvsched.core.store_health)."""

from __future__ import annotations

from kvsched.core.compaction import Checkpoint
from kvsched.core.shared_state import (
    SessionMeta,
    block_key,
    compaction_key,
    decode_checkpoints,
    encode_checkpoints,
    session_key,
)
from kvsched.core.store_health import ReadCost, StoreHealth
from tests.conftest import FakeClock


def test_keys_separate_models_ranks_salts_and_sessions() -> None:
    k = bytes(range(32))
    assert block_key("m1", k) != block_key("m2", k) != block_key("m1", k, rank=1)
    assert session_key("m", "s", None) != session_key("m", "s", "salt") != session_key("m", "t", None)
    assert session_key("m", "a b\u00e9", None).isascii()
    assert session_key("m", "s", None, "tenant-a") not in {session_key("m", "s", None), session_key("m", "s", None, "b")}
    assert compaction_key('["tiny", null, "s"]') != compaction_key('["tiny", "x", "s"]')


def test_session_meta_round_trip_and_junk_is_ignored() -> None:
    meta = SessionMeta(role="worker", ttl_s=30.0, turns=4, replica="r1", blocks=12)
    assert SessionMeta.decode(meta.encode()) == meta
    for junk in (None, "not json", "[]", '{"ttl_s": "x"}', '{"ttl_s": -1}', '{"turns": "many"}'):
        assert SessionMeta.decode(junk) is None


def test_checkpoints_round_trip_and_malformed_entries_are_dropped() -> None:
    cp = Checkpoint(digest="a" * 64, replaced=5, system_count=1, summary="the plan so far", summary_tokens=9)
    window = Checkpoint(digest="b" * 64, replaced=3, system_count=1, summary=None)
    assert decode_checkpoints(encode_checkpoints([cp, window])) == [cp, window]
    bad = '[{"digest": "short", "replaced": 5, "system_count": 1, "summary": "x"}, {"replaced": 2}, 7]'
    assert decode_checkpoints(bad) == []
    assert decode_checkpoints("{") == [] and decode_checkpoints(None) == []


def test_outage_is_reported_once_and_retries_back_off() -> None:
    clock = FakeClock()
    h = StoreHealth(clock, base_s=0.5, max_s=4.0)
    assert h.may_try() and not h.succeeded()
    assert h.failed() is True  # went down: log once
    assert not h.may_try()
    clock.advance(0.5)
    assert h.may_try()
    assert h.failed() is False  # still down: no second log
    assert h.retry_in_s == 1.0
    for _ in range(5):
        clock.advance(h.retry_in_s)
        h.failed()
    assert h.retry_in_s == 4.0  # capped
    clock.advance(4.0)
    assert h.succeeded() is True and h.up and h.outages == 1
    assert h.failed() is True and h.retry_in_s == 0.5  # a new outage starts from the base delay


def test_reads_run_inline_while_fast_and_within_the_steps_budget_and_again_once_fast() -> None:
    cost = ReadCost(inline_s=0.002, step_budget_s=0.002, alpha=0.5)
    assert cost.inline()  # nothing known: inline
    cost.note(0.0005, inline=True)
    assert cost.inline()
    for _ in range(3):
        cost.note(0.0005, inline=True)
    assert not cost.inline()  # this step's inline reads used the budget (4 x 0.5 ms) ...
    cost.new_step()
    assert cost.inline()  # ... the next step has its own
    cost.note(0.1, inline=True)  # one slow read: off the scheduler thread, whatever the step
    cost.new_step()
    assert not cost.inline()
    for _ in range(3):
        cost.note(0.0001, inline=False)  # the lookup thread's reads are fast again
    assert not cost.inline()
    for _ in range(3):
        cost.note(0.0001, inline=False)
    assert cost.inline() and cost.spent_s == 0.0  # the thread's reads cost the scheduler's step nothing


def test_a_save_merges_the_checkpoints_other_replicas_wrote():
    """Found by review: a replica's save overwrote the session's whole entry, erasing another replica's summaries."""
    from kvsched.core.shared_state import merge_checkpoints

    def cp(d, root="r" * 64):
        return Checkpoint(d * 64, 3, 1, f"summary {d}", 2, root)

    theirs = [cp("a"), cp("b", "q" * 64), cp("c")]
    ours = [cp("c"), cp("d")]
    assert merge_checkpoints(theirs, ours, 4) == [cp("a"), cp("b", "q" * 64), cp("c"), cp("d")]
    assert merge_checkpoints(theirs, ours, 4, drop_roots=frozenset(["q" * 64])) == [cp("a"), cp("c"), cp("d")]
    assert merge_checkpoints(theirs, ours, 4, drop_digests=frozenset(["a" * 64])) == [cp("b", "q" * 64), cp("c"),
                                                                                       cp("d")]
    assert merge_checkpoints(theirs, ours, 2) == [cp("b", "q" * 64), cp("c"), cp("d")]  # 2 per conversation, ours last
