"""`kvsched bench replay`'s bookkeeping without servers: which sides compare, and that a termination signal reaches the
`finally` that stops the servers."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kvsched.bench.trace_engine import _with_ratios, measured
from kvsched.serving import exit_on_signals


def metrics(prompt: float, hits: float) -> dict[str, float]:
    return {"vllm:prompt_tokens_total": prompt, "vllm:prefix_cache_hits_total": hits}


def test_a_side_with_failed_requests_or_other_prompts_gets_no_ratio():
    ok = measured([{"ttft_s": 0.1}] * 3, metrics(0, 0), metrics(300, 100), 1.0, 0.0, planned_prompt_tokens=300)
    failed = measured([{"ttft_s": 0.1}, {"error": "APIConnectionError: gone"}], metrics(0, 0), metrics(200, 10), 1.0,
                      0.0, planned_prompt_tokens=300)
    short = measured([{"ttft_s": 0.1}] * 3, metrics(0, 0), metrics(250, 10), 1.0, 0.0, planned_prompt_tokens=300)
    assert "invalid" not in ok and ok["prefill_tokens_computed"] == 200
    assert failed["invalid"] == "1 of 2 requests failed"
    assert short["invalid"] == "250 prompt tokens served, 300 planned"
    sides = _with_ratios({"stock": ok, "kvsched": failed, "kvsched-no-tier": short})
    assert sides["stock"]["over_stock"] == 1.0
    assert sides["kvsched"]["over_stock"] is None and sides["kvsched-no-tier"]["over_stock"] is None
    # nothing compares with a stock side that is not valid
    assert _with_ratios({"stock": dict(failed), "kvsched": dict(ok)})["kvsched"]["over_stock"] is None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_termination_signal_runs_the_finally_that_stops_the_servers(sig):
    stopped = []
    before = signal.getsignal(sig)
    with pytest.raises(SystemExit) as exc, exit_on_signals():
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises at once
        finally:
            stopped.append(True)
    assert stopped == [True] and exc.value.code == 128 + sig
    assert signal.getsignal(sig) == before  # the handler is put back


def test_the_same_memory_side_gets_the_bytes_of_the_pool_and_the_default_tier_in_pool_blocks():
    """Found by review: the kvsched side (its FP8 tier at the default 2x the pool's bytes) was compared only with stock
    on the pool alone. The stock-same-memory side's pool holds the bytes of both in bf16 blocks: 3x the usable blocks."""
    from kvsched.bench.trace_engine import SIDES, same_memory_blocks
    from kvsched.core.tier_config import AUTO_POOL_MULTIPLE

    assert AUTO_POOL_MULTIPLE == 2.0 and same_memory_blocks(2654) == 3 * 2653 + 1  # (+ vLLM's null block)
    assert SIDES["stock-same-memory"] == (*SIDES["stock"][:2], True) and not SIDES["stock"][2]


def test_the_simulator_predicts_lru_on_the_same_memory_pool_too():
    from kvsched.bench.trace_engine import predicted
    from kvsched.sim.trace import Trace, TraceRequest

    reqs = [TraceRequest(t=float(i), session=f"s{i % 6}", prompt_tokens=16 * (4 + i // 6), output_tokens=0,
                         blocks=list(range(100 * (i % 6), 100 * (i % 6) + 4 + i // 6))) for i in range(36)]
    sim = predicted(Trace.from_requests(16, reqs), capacity_blocks=12)
    same = sim["lru, same memory"]
    assert same["prefill_tokens_computed"] < sim["lru"]["prefill_tokens_computed"]  # 36 blocks hold more sessions


def test_the_warm_up_leaves_no_full_block_in_the_prefix_cache(monkeypatch):
    """Found by review: 31 prompt tokens with max_tokens=2 computed 32 tokens (the first output token is fed back), a
    full block vLLM cached. Run on vLLM's own scheduler and block pool (the harness), as the server would."""
    from kvsched.adapters.vllm.harness import (
        STOCK_SCHEDULER,
        HarnessConfig,
        RequestFactory,
        build_scheduler,
        run_until_idle,
    )
    from kvsched.bench import trace_engine as te
    from kvsched.tiny_model import SIZES, ensure_tiny_model

    sent = []

    class Client:  # what warm_up sends, through a stand-in for the openai client
        def __init__(self, **kw):
            self.completions = self

        def create(self, **kw):
            sent.append(kw)
            return iter(())

    monkeypatch.setattr("openai.OpenAI", Client)
    te.warm_up("http://unused/v1", SIZES["test"].vocab_size)
    assert len(sent) == te.WARMUP_REQUESTS
    s = build_scheduler(STOCK_SCHEDULER, HarnessConfig(model_dir=ensure_tiny_model("test"), num_blocks=64,
                                                       block_size=te.BLOCK_TOKENS))
    factory = RequestFactory(te.BLOCK_TOKENS)
    for kw in sent:
        s.add_request(factory.make(kw["prompt"], kw["max_tokens"]))
    run_until_idle(s)
    assert len(s.kv_cache_manager.block_pool.cached_block_hash_to_block) == 0


def _returning_session_trace():
    """s0 pins 4 blocks, returns at t=4; s1 and s2 (last turns: no pins) need 7 of the 12 blocks each meanwhile. At the
    simulator's speeds s1 holds its blocks 8 s, so s2's arrival takes s0's pin; an engine that answers in 0.2 s has s1
    gone by then, and s0's pin survives to its return."""
    from kvsched.sim.trace import Trace, TraceRequest

    reqs = [TraceRequest(t=0.0, session="s0", prompt_tokens=2048, output_tokens=1, blocks=[0, 1, 2, 3]),
            TraceRequest(t=4.0, session="s0", prompt_tokens=2560, output_tokens=1, blocks=[0, 1, 2, 3, 4]),
            TraceRequest(t=1.0, session="s1", prompt_tokens=3072, output_tokens=400, blocks=list(range(10, 16)),
                         end=True),
            TraceRequest(t=2.0, session="s2", prompt_tokens=3072, output_tokens=400, blocks=list(range(20, 26)),
                         end=True)]
    return Trace.from_requests(512, reqs)


def test_the_simulator_replays_each_measured_side_at_its_engine_timing_too():
    """Found on the conversation window (stop 55): the engine credited 2.4x the retained tokens the simulator
    predicted, because the simulator's time model holds a request's blocks for its GPU's seconds; replayed with the
    engine's own times, the same policy credits what the engine's pins kept."""
    from kvsched.bench.trace_engine import predicted

    fast = [0.2] * 4
    sim = predicted(_returning_session_trace(), capacity_blocks=12, durations={"kvsched-no-tier": fast},
                    block_tokens=32)
    assert sim["kvsched"]["retained_hit_tokens"] == 0  # its pin went to s2 under the simulator's timing
    timed = sim["kvsched, engine timing"]
    assert timed["retained_hit_tokens"] == 4 * 512 and timed["retained_hit_engine_tokens"] == 4 * 32
    assert timed["over_lru"] is None  # no stock side measured: no LRU at the engine's timing to divide by
    assert "lru, engine timing" not in sim and "kvsched + FP8 tier, engine timing" not in sim
    both = predicted(_returning_session_trace(), capacity_blocks=12, durations={"stock": fast, "kvsched-no-tier": fast})
    lru = both["lru, engine timing"]["prefill_tokens_computed"]
    assert both["kvsched, engine timing"]["over_lru"] == both["kvsched, engine timing"]["prefill_tokens_computed"] / lru


def test_a_request_reports_when_its_stream_ended():
    from kvsched.bench.trace_engine import send
    from kvsched.bench.trace_prompts import ReplayRequest

    class Client:
        class completions:  # noqa: N801 (the openai client's attribute)
            @staticmethod
            def create(**kw):
                return iter([1, 2, 3])

    out = send(Client(), ReplayRequest(at_s=0.0, session="s", prompt=[11, 12], max_tokens=3, blocks=0), object())
    assert out["done_s"] >= out["ttft_s"] >= 0.0
