"""The pin floors (kvsched/bench/sched_floor.py) on vLLM's real scheduler under what a serial test does not reach:
a session's turns running at once (branches among them), aborts of running and waiting requests, a pool small enough
that vLLM preempts and the shortage hook releases pins, and prefix-cache resets. After every step vLLM's reference
count of each block is its requests' plus the floor's pins', the free queue holds exactly the unreferenced blocks, and
the pins' counts (`VllmPinPool`'s array) are the blocks the pins hold: a disagreement is a block leaked or freed while
pinned (wrong KV served). Found sound by review (stop 62's floors); kept as the floors' guard."""

from __future__ import annotations

import random
from collections import Counter

import pytest

pytest.importorskip("vllm")

from tests.adapters.vllm.pool_invariants import block_count_violations, count_preemptions  # noqa: E402
from tests.bench.test_sched_floor import BLOCK, build, tokens  # noqa: E402


def violations(s) -> list[str]:
    pinned = Counter(b.block_id for blocks in s.pins.values() for b in blocks)
    errs = block_count_violations(s.kv_cache_manager, pinned)
    if dict(s.refs.items()) != dict(pinned) or s.pinned_blocks != len(pinned):
        errs.append(f"counts {dict(s.refs.items())} ({s.pinned_blocks}) != the pins' blocks {dict(pinned)}")
    return errs


@pytest.mark.parametrize("cls", ["FloorScheduler", "FloorIncScheduler", "FloorNoYieldScheduler"])
def test_overlapping_turns_aborts_preemption_and_resets_keep_vllms_counts(tiny_model_dir, monkeypatch, cls):
    from vllm.v1.request import RequestStatus

    from kvsched.adapters.vllm.harness import step

    yields = cls != "FloorNoYieldScheduler"  # without the shortage hook, pins past the requests' room starve them
    monkeypatch.setenv("KVSCHED_PIN_BUDGET_FRACTION", "0.9" if yields else "0.3")
    s, f = build(tiny_model_dir, f"kvsched.bench.sched_floor.{cls}", num_blocks=40)
    seen: Counter[str] = Counter()
    count_preemptions(monkeypatch, seen)
    rng = random.Random(5)
    history = {sid: tokens(10_000 * (i + 1), 3 * BLOCK) for i, sid in enumerate("abcde")}
    live: list[str] = []
    for n in range(600):
        if n % 100 < 70 and len(live) < 8 and rng.random() < 0.5:  # then 30 steps to drain
            sid = rng.choice("abcde")
            h = history[sid]
            if rng.random() < 0.2:  # a branch off the session's older prefix
                prompt = h[:rng.randint(1, len(h))] + tokens(500_000 + n * 100, rng.randint(1, 40))
            else:
                h += tokens(100_000 + n * 100, rng.randint(1, 2 * BLOCK))
                if len(h) > 12 * BLOCK:
                    del h[3 * BLOCK:]
                prompt = list(h)
            r = f.make(prompt, rng.randint(1, 3 * BLOCK), session_id=sid if rng.random() < 0.9 else None)
            s.add_request(r)
            live.append(r.request_id)
            seen["overlapping turns"] += sum(1 for k in s.session_of.values() if k.session_id == sid) > 1
        if live and rng.random() < 0.08:  # an abort, running or waiting
            s.finish_requests(live.pop(rng.randrange(len(live))), RequestStatus.FINISHED_ABORTED)
            seen["aborts"] += 1
        if not s.has_requests():
            if rng.random() < 0.3:
                assert s.reset_prefix_cache() and not s.pins and s.pinned_blocks == 0, n
                seen["resets"] += 1
            continue
        _, outputs = step(s)
        for o in (o for out in outputs.values() for o in out.outputs):
            if o.finish_reason is not None and o.request_id in live:
                live.remove(o.request_id)
        assert violations(s) == [], n
    assert all(seen[k] for k in ("preemptions", "overlapping turns", "aborts", "resets")), seen
    assert s.released["turn"] and (s.released["shortage"] if yields else s.released["budget"]), s.released
