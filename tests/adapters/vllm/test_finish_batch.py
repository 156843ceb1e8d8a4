"""A step's finished requests are pinned and freed together at the end of `update_from_output`
(compat/finish_batch.py): no finished request's blocks may outlive the call that freed them in stock vLLM, and the KV
usage vLLM reports for the step must be the pool's after those frees, as stock's is."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import (  # noqa: E402
    KVSCHED_SCHEDULER,
    STOCK_SCHEDULER,
    RequestFactory,
    run_until_idle,
    step,
)
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402
from tests.adapters.vllm.pool_invariants import pool_violations  # noqa: E402


def _held_by_requests(s) -> set[str]:
    return {rid for m in s.kv_cache_manager.coordinator.single_type_managers for rid in m.req_to_blocks}


def _add_turns(s, f, n: int, round_: int) -> None:
    """`n` sessions' turns of different lengths and output lengths: they finish in different steps, several at once."""
    for i in range(n):
        prompt = [1, 2, 3] * 10 + [100 * i + j for j in range(20 + 7 * i + round_ * 5)]
        s.add_request(f.make(prompt, 2 + i % 4, session_id=f"s{i}"))


def _check_step(s, outputs) -> int:
    """After one step: every request vLLM finished in it is gone with its blocks, the pool's invariants hold and the
    stats report the pool's usage as it is now. Returns the requests finished."""
    finished = [o.request_id for eco in outputs.values() for o in eco.outputs if o.finish_reason is not None]
    held = _held_by_requests(s)
    for rid in finished:
        assert rid not in s.requests and rid not in held, f"{rid} finished but still holds its blocks"
    assert s.kvsched_finishes.held is None  # nothing left for later
    assert pool_violations(s) == []
    stats = next(eco.scheduler_stats for eco in outputs.values() if eco.scheduler_stats is not None)
    assert stats.kv_cache_usage == s.kv_cache_manager.usage  # reported after the frees, as stock reports them
    return len(finished)


@pytest.mark.parametrize("tier", [False, True], ids=["plain", "fp8-tier"])
def test_finished_requests_are_freed_and_reported_within_their_step(harness_cfg, clock, tier):
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    cfg = replace(harness_cfg, num_blocks=256, kv_transfer_config=kv_transfer_config(0.01) if tier else None)
    s, f = _sched(cfg, clock=clock), RequestFactory(BLOCK)
    finished = many = 0
    for round_ in range(3):
        _add_turns(s, f, 6, round_)
        while s.has_requests():
            _, outputs = step(s)
            n = _check_step(s, outputs)
            finished, many = finished + n, many + (n > 1)
    assert finished == 18 and many  # several turns finished together in some step
    assert s.kvsched.stats()["pins"] == 18


def test_reported_kv_usage_is_stocks_step_by_step(harness_cfg):
    """Nothing pinned (prefix caching off): kvsched's scheduler holds no block stock's would not, so the usage it
    reports each step is stock's exactly, including the steps in which requests finish."""
    cfg = replace(harness_cfg, num_blocks=256, prefix_caching=False)
    usage = {}
    for cls in (STOCK_SCHEDULER, KVSCHED_SCHEDULER):
        s, f, seen = _sched(cfg, cls), RequestFactory(BLOCK), []
        for round_ in range(2):
            _add_turns(s, f, 6, round_)
            while s.has_requests():
                _, outputs = step(s)
                seen.append(next(eco.scheduler_stats.kv_cache_usage for eco in outputs.values()
                                 if eco.scheduler_stats is not None))
        usage[cls] = seen
    assert usage[KVSCHED_SCHEDULER] == usage[STOCK_SCHEDULER]
    assert max(usage[STOCK_SCHEDULER]) > 0 and usage[STOCK_SCHEDULER][-1] == 0


def test_a_request_failed_inside_the_step_is_freed_with_it(harness_cfg, clock):
    """`update_from_output` finishes erred requests itself (`finish_requests`, after its loop): freed before it
    returns, pinned like any other."""
    s, f = _sched(replace(harness_cfg, num_blocks=256), clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make(list(range(200, 260)), 50, session_id="a"))
    step(s)
    step(s)
    [rid] = s.requests
    s.grammar_compile_error_reqs.add(rid)  # as vLLM marks a request whose grammar failed to compile
    _, outputs = step(s)
    assert rid not in s.requests and rid not in _held_by_requests(s) and pool_violations(s) == []
    assert s.kvsched.stats()["pins"] == 1


def test_an_abort_between_steps_frees_at_once(harness_cfg, clock):
    """Outside `update_from_output` nothing is held: an abort's free (the API server's `finish_requests`) happens in
    the call, pin first."""
    from vllm.v1.request import RequestStatus

    s, f = _sched(replace(harness_cfg, num_blocks=256), clock=clock), RequestFactory(BLOCK)
    s.add_request(f.make(list(range(300, 360)), 50, session_id="b"))
    step(s)
    step(s)
    [rid] = s.requests
    s.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
    assert rid not in s.requests and rid not in _held_by_requests(s) and pool_violations(s) == []
    assert s.kvsched.stats()["pins"] == 1
    run_until_idle(s)
