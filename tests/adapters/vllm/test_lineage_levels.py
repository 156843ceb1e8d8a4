"""A new branch never gets a key under which the tier's lower levels still keep a session's KV (kvsched.core.lineage:
`in_use`), on vLLM's real scheduler with the disk level configured (no model, no worker: the test acks the disk writes
as the worker would). Found by review: the check looked at the policy's sessions and the host tier only, so once the
host copy was evicted (kept on disk) and the id's branches had left lineage's bounded books, the id's next
conversation was given the old branch's key: it took over the old conversation's disk blocks, and its end deleted
them."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import FAKE_TOKEN, RequestFactory, run_until_idle, step  # noqa: E402
from kvsched.adapters.vllm.tier_levels import DISK, TierLevels  # noqa: E402
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig  # noqa: E402
from kvsched.core.sessions import SessionId, SessionKey  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK, sched  # noqa: E402


def _ack_disk_writes(s) -> None:
    step(s)  # the turn's writes are planned at its end: the worker writes them (here: acked)
    lv = s.connector.levels
    lv.written([(k, True) for k in list(lv.disk.pending)], disk_full=False)


def _disk_fetches(s) -> int:
    n = 0
    while s.has_requests():
        out, _ = step(s)
        meta = out.kv_connector_metadata
        if meta is not None and meta.levels:
            n += sum(1 for f in meta.levels.fetches if f.source == DISK)
    return n


def test_a_new_branch_never_takes_the_key_of_a_session_the_disk_level_still_keeps(harness_cfg, clock, tmp_path,
                                                                                   monkeypatch):
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    monkeypatch.setenv("KVSCHED_MAX_SESSIONS", "2")  # the policy's and lineage's books: 2 sessions, 2 retired ids
    tier = kv_transfer_config(0.0001, disk_dir=str(tmp_path), disk_gb=0.01)  # 13 host slots, 10 MiB of disk
    s, f = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock), RequestFactory(BLOCK)
    kp, lv = s.kvsched, s.connector.levels
    history = list(range(100, 260))  # 10 full blocks
    s.add_request(f.make(history, 4, session_id="A", xargs={"ttl_s": 0}))
    run_until_idle(s)
    _ack_disk_writes(s)
    old = next(iter(kp.policy.sessions))
    old_blocks = list(lv.disk.keys_of[old])
    assert len(old_blocks) == 10 and all(k in lv.disk.written for k in old_blocks)
    for i in range(14):  # other ids: A's record, lineage entry and retired number go; its host copy is evicted
        s.add_request(f.make([1000 + 50 * i + j for j in range(40)], 4, session_id=f"o{i}", xargs={"ttl_s": 0}))
        run_until_idle(s)
        _ack_disk_writes(s)
    d = kp.tier.directory
    assert old not in kp.policy.sessions and old not in d.keys_of and old not in d.tail_of
    assert old in lv.disk.keys_of  # ... and the disk level keeps its 10 blocks under its key
    # The id's next conversation (another prompt): a new branch, never the key the disk keeps the old one under
    s.add_request(f.make(list(range(5000, 5040)), 4, session_id="A", request_id="other",
                         xargs={"session_end": True}))
    other = kp.requests["other"][0]
    assert other != old
    run_until_idle(s)  # ... and its end leaves the old conversation's disk blocks alone
    assert all(k in lv.disk.written for k in old_blocks) and lv.disk.keys_of[old] == old_blocks
    for i in range(4):  # a flood evicts the pool's copies
        s.add_request(f.make([7000 + i] * 330, 4))
        run_until_idle(s)
    s.add_request(f.make(history + [4] * 3 + list(range(900, 940)), 4, session_id="A"))
    assert _disk_fetches(s) == 10  # the old conversation's next turn restores its history from disk


def test_a_strangers_identical_first_prompt_that_ends_its_session_ends_only_its_own(harness_cfg, clock, tmp_path):
    """Requests without a session field: a second user's first prompt identical to the first user's joins the first
    user's inferred session (a retry looks the same), and one session they stay until the answers differ. Found by
    review: with an end hint (which applies to an inferred session), the second user's turn ended the first user's
    session, its pin, host-tier tail and disk blocks with it. An ending turn joins only a session whose answer it
    repeats."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    tier = kv_transfer_config(0.01, disk_dir=str(tmp_path), disk_gb=0.01)
    s, f = sched(replace(harness_cfg, kv_transfer_config=tier), clock=clock), RequestFactory(BLOCK)
    kp, lv = s.kvsched, s.connector.levels
    prompt = list(range(100, 260)) + [5, 6, 7]
    s.add_request(f.make(prompt, 20, request_id="u1"))
    first = kp.requests["u1"][0]
    run_until_idle(s)
    _ack_disk_writes(s)
    pinned, on_disk = kp.policy.sessions[first].pinned_blocks, list(lv.disk.keys_of[first])
    assert pinned == len(on_disk) == 11 and first in kp.tier.directory.tail_of
    s.add_request(f.make(prompt, 4, request_id="u2", xargs={"session_end": True}))
    assert kp.requests["u2"][0] != first
    run_until_idle(s)
    _ack_disk_writes(s)
    assert kp.policy.sessions[first].pinned_blocks == pinned and first in kp.tier.directory.tail_of
    assert lv.disk.keys_of[first] == on_disk and all(k in lv.disk.written for k in on_disk)
    s.add_request(f.make([*prompt, *[FAKE_TOKEN] * 19, 1, 2, 3], 4, request_id="u1-last", xargs={"session_end": True}))
    assert kp.requests["u1-last"][0] == first  # the first user's own last turn (it repeats the answer) ends it
    run_until_idle(s)
    assert first not in kp.policy.sessions and first not in lv.disk.keys_of


def test_after_a_restart_the_disk_level_keeps_nothing_under_any_key(tmp_path: Path):
    """A restarted engine numbers branches and inferred sessions from scratch: its disk level indexes the files it
    finds with no owner, so a key of the previous run (`inferred-1`, branch 0 of an id) owns nothing there, and a
    session given it neither inherits nor deletes the previous run's blocks (a restore claims blocks by content)."""
    chain = [bytes([i]) * 32 for i in range(6)]
    cfg = LevelsConfig(disk_dir=str(tmp_path / "disk"), disk_gb=1.0)
    key = SessionKey(SessionId("inferred-1"), None, None, inferred=True)
    first = TierLevels(cfg, "ab" * 16, {"model": "t"}, 1000, 1)
    first.turn_finished(key, [(k, i) for i, k in enumerate(chain)], None)
    for k in list(first.disk.pending):
        first.disk_files.write(k, b"block")
    first.written([(k, True) for k in chain], disk_full=False)
    assert first.keeps(key)
    del first
    gc.collect()  # the engine is gone (its directory lock with it)
    again = TierLevels(cfg, "ab" * 16, {"model": "t"}, 1000, 1)
    assert again.disk is not None and len(again.disk.written) == 6 and again.disk.keys_of == {}
    assert not again.keeps(key)
    again.session_ended(key)  # the new run's session of that key ends: the previous run's files stay
    assert not again.take_ops().deletes and len(again.disk.written) == 6
