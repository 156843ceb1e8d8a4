"""kvsched's pins and their reference counts (`VllmPinPool`'s array over vLLM's block ids) on vLLM's real scheduler
through every path that gives blocks back or takes them away at once: a session's turns running together (a branch
among them), unnamed turns, aborts of running and waiting requests, vLLM's preemptions in a small pool (the pins
yielding first), the admin route's end of a session, TTL expiry, budget releases and prefix-cache resets (with and
without running requests). After every operation each block's vLLM reference count is its requests' plus its pins',
the free queue holds exactly the unreferenced blocks and the array counts what the pins hold (`pool_violations`): a
disagreement is a block leaked or freed while pinned (wrong KV served). Found sound by review (stop 62's array)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import harness as h  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import count_preemptions, pool_violations  # noqa: E402


@pytest.mark.parametrize("seed", [1, 2])
def test_every_path_that_moves_blocks_keeps_vllms_counts_and_the_pins_alike(harness_cfg, clock, monkeypatch, seed):
    from vllm.v1.request import RequestStatus

    monkeypatch.setenv("KVSCHED_PIN_BUDGET_FRACTION", "0.6")
    s, f = _sched(harness_cfg, clock=clock), h.RequestFactory(BLOCK)
    seen: Counter[str] = Counter()
    count_preemptions(monkeypatch, seen)
    rng = random.Random(seed)
    history = {sid: list(range(1000 * (i + 1), 1000 * (i + 1) + 2 * BLOCK)) for i, sid in enumerate("abcdef")}
    live: list[str] = []
    for n in range(500):
        roll = rng.random()
        if roll < 0.35 and len(live) < 7:
            sid = rng.choice("abcdef")
            hist = history[sid]
            if rng.random() < 0.2:  # a branch off the session's older prefix
                prompt = hist[:rng.randint(1, len(hist))] + list(range(50_000 + 50 * n, 50_000 + 50 * n + 30))
            else:
                hist += [h.FAKE_TOKEN] * 2 + list(range(100_000 + 50 * n, 100_000 + 50 * n + rng.randint(1, 40)))
                if len(hist) > 14 * BLOCK:
                    del hist[2 * BLOCK:]
                prompt = list(hist)
            r = f.make(prompt, rng.randint(1, 3 * BLOCK), session_id=sid if rng.random() < 0.85 else None)
            s.add_request(r)
            live.append(r.request_id)
        elif roll < 0.40 and live:  # an abort, running or waiting
            s.finish_requests(live.pop(rng.randrange(len(live))), RequestStatus.FINISHED_ABORTED)
            seen["aborts"] += 1
        elif roll < 0.43:  # the admin route's end of a session, maybe while its turn runs
            seen["ends"] += s("end", rng.choice("abcdef"))["ended"]
        elif roll < 0.45:
            clock.advance(rng.choice([1.0, 40.0]))  # past the default TTL now and then
        elif roll < 0.47:
            running = rng.random() < 0.5
            if s.reset_prefix_cache(running):
                seen["resets"] += 1
                seen["resets with requests"] += bool(live)
        if s.has_requests():
            _, outputs = h.step(s)
            for o in (o for out in outputs.values() for o in out.outputs):
                if o.finish_reason is not None and o.request_id in live:
                    live.remove(o.request_id)
        assert pool_violations(s) == [], n
    h.run_until_idle(s)
    assert pool_violations(s) == []
    c = s.kvsched.policy.counters
    assert all(seen[k] for k in ("preemptions", "aborts", "ends", "resets", "resets with requests")), seen
    assert c["pins"] and c["released_turn"] + c["released_turn_partial"] and c["released_pressure"] + c[
        "released_pressure_partial"], dict(c)
