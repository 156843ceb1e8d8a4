"""The simulator applies kvsched's decisions as the engine does: one seeded trace, replayed by the simulator and run
through vLLM's own scheduler, KV cache manager and block pool (kvsched/adapters/vllm/harness.py: no model), yields the
same pins and releases (reason, blocks, blocks demoted to the FP8 tier) in the same order, and the same prefill.

Both sides run `kvsched.core.pin_apply.PinApplier`; what this test guards is everything around it on each side: the
hooks that feed it events (SessionPins / KVSchedPolicy), the pool adapters (VllmPinPool / SimPinPool), the tier, and
the two pools. What differs between the two by design is kept out of the trace, so any difference left is a bug:
- Concurrency: the simulator allocates a request whole on admission while vLLM schedules prefill chunks and decode
  steps, so requests are sent one at a time in trace order; each finishes at its own arrival time (the replay runs
  with zero prefill and decode time), before the next arrives.
- Prompts are whole blocks and generate one token (the trace's output is 0 tokens; vLLM's one sampled token never
  gets KV): no partial last block (the tier's `save_tail`, which the simulator does not model), no block completed
  by decode, and every turn adds a block, so the prompt's last block, which vLLM always computes into a new block, is
  never already cached.
- The tier's prefetch ahead of a turn (not modelled by the simulator) is off on the vLLM side: both sides restore
  from the tier when the request is admitted.
- The engine here steps only when a request is sent, so pins due to expire by then expire before it is added, as a
  busy engine's steps and the replay (which expires at every event, before handling it) would do: else a pin that
  expired while the engine was idle survives when its own session is the next to arrive (the queued-session rule).
Token ids are derived from the trace's block ids, so vLLM's block-hash chains share exactly what the trace shares.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import replace

import pytest

from kvsched.core.pin_apply import Applied
from kvsched.sim.generator import TraceConfig, generate_requests
from kvsched.sim.replay import ReplayConfig, ReplayResult, replay
from kvsched.sim.trace import Trace
from kvsched.sim.workload import Topology
from tests.conftest import FakeClock

pytest.importorskip("vllm")

BS = 16
# 3 workflows x (an orchestrator and 2 workers): 9 sessions, 42 turns of up to ~2,300 tokens; an 8 s TTL (tool calls
# take ~2 s) so that some pins expire.
TRACE = TraceConfig(topology=Topology.HIERARCHICAL, workflows=3, workers=2, rounds=2, worker_turns=3, block_size=BS,
                    system_tokens=256, role_prompt_tokens=64, brief_tokens=(100, 400), session_tokens=(1200, 2400),
                    tool_sigma=0.0, output_tokens=(0, 0), arrival_window_s=5.0, ttl_s=8.0)
TIER_GIB = 0.001  # ~130 slots of the tiny model's 8 KiB blocks: smaller than what pressure demotes, so it evicts too


def whole_block_trace(seed: int) -> Trace:
    reqs = list(generate_requests(replace(TRACE, seed=seed)))
    last: dict[str, int] = {}
    for r in reqs:
        n = r.reuse + len(r.blocks)
        assert n > last.get(r.session, 0), "every turn must add a block (see the module docstring)"
        last[r.session] = n
        r.prompt_tokens = n * BS
    return Trace.from_requests(BS, reqs, dense_ids=True)


def run_engine(trace: Trace, capacity: int, model_dir):
    """The trace through vLLM's scheduler with kvsched (and its FP8 tier): (scheduler, applied decisions, prompt tokens
    computed)."""
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config
    from kvsched.adapters.vllm.harness import (
        KVSCHED_SCHEDULER,
        HarnessConfig,
        PrefillCounts,
        RequestFactory,
        build_scheduler,
        run_until_idle,
    )

    cfg = HarnessConfig(model_dir=model_dir, num_blocks=capacity + 1, block_size=BS, max_model_len=4096,
                        max_num_batched_tokens=4096, kv_transfer_config=kv_transfer_config(TIER_GIB))
    s = build_scheduler(KVSCHED_SCHEDULER, cfg)
    clock = FakeClock(0.0)
    s.kvsched.policy.clock = clock
    s.kvsched.prefetcher = None  # not modelled by the simulator (module docstring)
    s.kvsched.pins.on_dropped = None
    s.kvsched.pins.log = applied = []
    factory, counts = RequestFactory(BS), PrefillCounts()
    for i in range(len(trace)):
        clock.now = float(trace.t[i])
        s.kvsched.expire()  # what is due by now, before the request arrives, as a busy engine's step (and the replay)
        session, salt = trace.sessions[trace.session[i]]
        prompt = [100 + int(b) for b in trace.blocks(i) for _ in range(BS)]
        xargs = {"agent_role": trace.role[i], "ttl_s": float(trace.ttl_s[i])} | ({"session_end": 1} if trace.end[i]
                                                                                 else {})
        s.add_request(factory.make(prompt, 1, session_id=session, xargs=xargs, cache_salt=salt))
        run_until_idle(s, counts=counts)
    return s, applied, counts.prompt_tokens - counts.cached_tokens


def run_sim(trace: Trace, capacity: int, engine) -> ReplayResult:
    """The trace through the simulator, configured as the engine was (pool, tier slots, KV bytes, retention)."""
    d = engine.kvsched.tier.directory
    cfg = ReplayConfig(capacity_blocks=capacity, prefill_tps=math.inf, tpot_s=0.0,
                       bytes_per_token=engine.kvsched.policy.bytes_per_token, retention=engine.kvsched.policy.config,
                       tier_bytes=d.num_slots * d.block_bytes, tier_block_bytes=d.block_bytes, check=True,
                       record_applied=True)
    return replay(trace, "kvsched", cfg)


def differences(engine, applied: list[Applied], prefill: int, sim: ReplayResult) -> list[str]:
    """What the engine's run and the simulator's did differently: the first differing decision, prefill, restores."""
    out = []
    for k, (a, b) in enumerate(zip(applied, sim.applied, strict=False)):
        if a != b:
            out.append(f"decision {k}: engine {a}, simulator {b}")
            break
    if len(applied) != len(sim.applied):
        out.append(f"engine applied {len(applied)} decisions, simulator {len(sim.applied)}")
    if prefill != sim.prefill_tokens_computed:
        out.append(f"prefill tokens: engine {prefill}, simulator {sim.prefill_tokens_computed}")
    if (restored := engine.kvsched.tier.stats["restored_blocks"] * BS) != sim.restored_tokens:
        out.append(f"tokens restored from the tier: engine {restored}, simulator {sim.restored_tokens}")
    pb = engine.kvsched.policy.payback
    mine = (pb.real_hits, pb.lru_hits, pb.switches)
    theirs = tuple(sim.policy_stats[f"payback_{k}"] for k in ("real_hits", "lru_hits", "switches"))
    if mine != theirs:
        out.append(f"payback tracker (real hits, ghost LRU hits, switches): engine {mine}, simulator {theirs}")
    if pb.ledger is not None:
        mine_l = (pb.ledger.balance, pb.ledger.variance, pb.ledger.cap)
        theirs_l = tuple(sim.policy_stats[f"payback_{k}"] for k in ("balance", "variance", "ttl_cap_s"))
        if mine_l != theirs_l:
            out.append(f"pin ledger (balance, variance, TTL cap): engine {mine_l}, simulator {theirs_l}")
    return out


SCENARIOS = {  # name: (seed, KVSCHED_* settings, the release reasons the run must include)
    "pressure": (0, {}, {"pressure", "ttl", "end"}),
    "budget": (2, {"KVSCHED_PIN_BUDGET_FRACTION": "0.8"}, {"budget", "pressure", "end"}),
    # the pins' payback tracker fed by both sides (every block key sampled; windows short enough to switch)
    "payback": (0, {"KVSCHED_PAYBACK_SAMPLING": "1", "KVSCHED_PAYBACK_WINDOW": "4", "KVSCHED_PAYBACK_COOLDOWN": "4",
                    "KVSCHED_PAYBACK_MARGIN": "-0.5", "KVSCHED_PAYBACK_START_TTL_S": "0",
                    "KVSCHED_PAYBACK_FROM_START": "1"}, {"payback", "pressure", "end"}),
    # the same, fed from the pool's first eviction (the default): both sides start feeding it at the same request
    "payback_armed": (0, {"KVSCHED_PAYBACK_SAMPLING": "1", "KVSCHED_PAYBACK_WINDOW": "4",
                          "KVSCHED_PAYBACK_COOLDOWN": "4", "KVSCHED_PAYBACK_MARGIN": "-0.5",
                          "KVSCHED_PAYBACK_START_TTL_S": "0"}, {"pressure"}),
    # the pin ledger instead of the switch: every key sampled, pins start capped at 4 s with the tier (the trace hints 8 s)
    "ledger": (0, {"KVSCHED_PAYBACK_SAMPLING": "1", "KVSCHED_PAYBACK_TIER_START_TTL_S": "4", "KVSCHED_PAYBACK_GAIN": "1",
                   "KVSCHED_PAYBACK_DEADBAND": "1", "KVSCHED_PAYBACK_FROM_START": "1"},
               {"ttl", "pressure", "end"}),
    # the ledger cut on a small loss (no dead band, a steep fall, a high floor): held pins bounded on both sides (seed
    # 5: at seed 0 the tier restores 362 blocks, not 175, since its lists keep chain order, and the ledger never falls)
    "ledger_cut": (5, {"KVSCHED_PAYBACK_SAMPLING": "1", "KVSCHED_PAYBACK_TIER_START_TTL_S": "8",
                       "KVSCHED_PAYBACK_DEADBAND": "0", "KVSCHED_PAYBACK_GAIN_DOWN": "8", "KVSCHED_PAYBACK_FLOOR": "0.5",
                       "KVSCHED_PAYBACK_FROM_START": "1"}, {"pressure", "end"}),
}


@functools.cache
def scenario(name: str, model_dir):
    """(trace, pool capacity, the engine's scheduler, its applied decisions, its prefill), once per test session."""
    seed, env, _ = SCENARIOS[name]
    trace = whole_block_trace(seed)
    capacity = trace.working_set_blocks() // 3
    with pytest.MonkeyPatch.context() as mp:
        for var, value in env.items():
            mp.setenv(var, value)  # the engine reads RetentionConfig from the environment
        return (trace, capacity, *run_engine(trace, capacity, model_dir))


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_the_simulator_applies_the_same_decisions_as_vllm(name, tiny_model_dir):
    trace, capacity, engine, applied, prefill = scenario(name, tiny_model_dir)
    sim = run_sim(trace, capacity, engine)
    # the scenario exercises what it is meant to: releases of each reason, demotions, tier evictions and restores
    seen = Counter(a.reason for a in applied if a.op == "release")
    assert SCENARIOS[name][2] <= set(seen), seen
    tier = engine.kvsched.tier
    assert sum(a.demoted for a in applied) > 0 and not tier.directory.tail_of
    payback = engine.kvsched.policy.payback
    if name == "payback":  # suspended pins leave the tier little to do there
        assert payback.lru_hits > 0
    else:
        assert tier.directory.counters["evicted_blocks"] > 0 and tier.stats["restored_blocks"] > 0
    if name == "payback_armed":  # armed by the pool's first eviction, judged once the ghost filled, on both sides
        assert payback.armed and payback.warm and payback.lru_hits > 0
    if name == "ledger_cut":  # found so: a clamp's releases were applied at the next step in the engine, before the
        # turn's end in the simulator, and the pools' orders (then the tier's restores) drifted apart
        assert engine.kvsched.stats()["payback_clamped_pins"] > 0
    if name == "ledger":  # the cap moved with a balance both sides count
        ledger = engine.kvsched.policy.payback.ledger
        assert ledger.balance != 0 and ledger.cap != 4.0
    assert differences(engine, applied, prefill, sim) == []


def test_a_change_to_either_sides_apply_glue_alone_is_caught(tiny_model_dir):
    """Pins given back head first instead of tail first, on one side only: the two part ways."""
    from kvsched.adapters.vllm.pin_pool import VllmPinPool
    from kvsched.sim.policies import SimPinPool

    trace, capacity, engine, applied, prefill = scenario("pressure", tiny_model_dir)
    sim = run_sim(trace, capacity, engine)
    assert differences(engine, applied, prefill, sim) == []
    for side in (SimPinPool, VllmPinPool):
        give_back = side.give_back
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(side, "give_back", lambda self, blocks, give_back=give_back: give_back(self, blocks[::-1]))
            if side is SimPinPool:
                assert differences(engine, applied, prefill, run_sim(trace, capacity, engine)) != []
            else:
                assert differences(*run_engine(trace, capacity, tiny_model_dir), sim) != []


def branching_trace() -> Trace:
    """Session a: three turns on one line, then one that branches off after two blocks, then one on each line again
    (the engine's lineage makes the branch a session of its own, whose pin leaves the first line's alone); session b
    runs beside it. Whole blocks, each turn adds one (module docstring); ids name their whole prefix."""
    from kvsched.sim.trace import TraceRequest

    line = [f"a{k}" for k in range(9)]
    branch = ["a0", "a1", "b2", "b3"]
    turns = [("a", line[:3]), ("b", ["x0", "x1"]), ("a", line[:5]), ("a", branch), ("b", ["x0", "x1", "x2"]),
             ("a", line[:7]), ("a", [*branch, "b4"]), ("a", line[:9])]
    reqs = [TraceRequest(t=float(k), session=s, prompt_tokens=len(b) * BS, output_tokens=0, blocks=b, role="worker",
                         ttl_s=30.0) for k, (s, b) in enumerate(turns)]
    return Trace.from_requests(BS, reqs)


def test_a_branch_gets_a_pin_of_its_own_in_both(tiny_model_dir):
    """The simulator runs the engine's session lineage: the branching turn is pinned as a branch of its own, so the
    first line's pin stays and its next turn hits all of it, on both sides alike."""
    trace = branching_trace()
    capacity = 4 * trace.working_set_blocks()  # no pressure: only lineage decides what stays
    engine, applied, prefill = run_engine(trace, capacity, tiny_model_dir)
    sim = run_sim(trace, capacity, engine)
    assert differences(engine, applied, prefill, sim) == []
    assert engine.kvsched.resolver.lineage.stats()["branches"] == sim.policy_stats["branches"] == 1
    assert [a.op for a in applied].count("release") == 0  # no turn gave back the other line's blocks
    # every turn computes only the blocks it adds (3 and 2 first, then 2, 2, 1, 2, 1, 2): each line's pin held
    assert prefill == 15 * BS
