"""The pin floor (kvsched/bench/sched_floor.py), the baseline `tools/sched_sides.py` measures stock and kvsched
against: its pins hold a session's prefix through pressure that evicts it from stock vLLM's pool, and past the budget
it releases whole pins least recently pinned first (vLLM's real scheduler and block pool, no model)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

BLOCK = 16


def build(model_dir, cls: str, num_blocks: int):
    from kvsched.adapters.vllm.harness import HarnessConfig, RequestFactory, build_scheduler

    cfg = HarnessConfig(model_dir=model_dir, num_blocks=num_blocks, block_size=BLOCK, max_num_seqs=8,
                        max_num_batched_tokens=4096, max_model_len=2048)
    return build_scheduler(cls, cfg), RequestFactory(BLOCK)


def serve(scheduler, requests) -> dict[str, int]:
    """Add `requests` and run them to the end: request id -> its prompt tokens hit in the prefix cache."""
    from kvsched.adapters.vllm.harness import step

    for r in requests:
        scheduler.add_request(r)
    hits: dict[str, int] = {}
    while scheduler.has_requests():
        out, _ = step(scheduler)
        for new in out.scheduled_new_reqs:
            hits[new.req_id] = int(new.num_computed_tokens)
    return hits


def tokens(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def second_turn_hit(model_dir, cls: str) -> int:
    """A session's 10-block first turn, then two waves of unnamed requests (30 blocks, then 40) on a 63-block pool,
    then the session's second turn: the tokens of its prompt that hit."""
    s, f = build(model_dir, cls, num_blocks=64)
    first = tokens(10_000, 10 * BLOCK)
    serve(s, [f.make(first, 1, session_id="a")])
    serve(s, [f.make(tokens(20_000 + 1000 * i, 15 * BLOCK), 1) for i in range(2)])
    serve(s, [f.make(tokens(30_000 + 1000 * i, 20 * BLOCK), 1) for i in range(2)])
    nxt = f.make(first + tokens(40_000, 40), 1, session_id="a")
    return serve(s, [nxt])[nxt.request_id]


def test_a_pin_keeps_the_prefix_that_pressure_evicts_from_stock(tiny_model_dir):
    from kvsched.adapters.vllm.harness import STOCK_SCHEDULER
    from kvsched.bench.sched_floor import FLOOR_SCHEDULER

    assert second_turn_hit(tiny_model_dir, STOCK_SCHEDULER) == 0  # the waves evicted the whole prefix
    assert second_turn_hit(tiny_model_dir, FLOOR_SCHEDULER) == 10 * BLOCK  # the pin kept all of it


def test_the_pin_goes_at_the_next_start_and_comes_back_at_its_finish(tiny_model_dir):
    from kvsched.adapters.vllm.harness import step
    from kvsched.bench.sched_floor import FLOOR_SCHEDULER

    s, f = build(tiny_model_dir, FLOOR_SCHEDULER, num_blocks=64)
    first = tokens(10_000, 10 * BLOCK)
    serve(s, [f.make(first, 1, session_id="a")])
    (key, pinned), = s.pins.items()
    assert key.session_id == "a" and len(pinned) == 10 and all(b.ref_cnt == 1 for b in pinned)
    s.add_request(f.make(first + tokens(40_000, 40), 20, session_id="a"))
    step(s)  # scheduled (20 tokens to sample): it holds the ten blocks it hit, the pin's references are gone
    assert not s.pins and not s.refs and all(b.ref_cnt == 1 for b in pinned) and s.released["turn"] == 1
    serve(s, [])  # 200 prompt tokens and 19 computed answer tokens: 13 full blocks
    assert [len(b) for b in s.pins.values()] == [13] and s.pinned_blocks == 13 and s.released["turn"] == 1
    assert s.pins[key][:10] == pinned


def test_past_the_budget_the_least_recently_pinned_sessions_go_first(tiny_model_dir, monkeypatch):
    from kvsched.bench.sched_floor import FLOOR_SCHEDULER

    monkeypatch.setenv("KVSCHED_PIN_BUDGET_FRACTION", "0.1")  # of 255 usable blocks: 25
    s, f = build(tiny_model_dir, FLOOR_SCHEDULER, num_blocks=256)
    assert s.budget == 25
    prompt = {sid: tokens(10_000 * (i + 1), 10 * BLOCK) for i, sid in enumerate("abcd")}

    def turn(sid: str, more: int = 0) -> None:
        serve(s, [f.make(prompt[sid] + tokens(90_000, more), 1, session_id=sid)])

    def order() -> list[str]:
        return [k.session_id for k in s.pins]

    turn("a")
    turn("b")
    held = {sid: list(blocks) for sid, blocks in zip("ab", s.pins.values(), strict=True)}
    assert order() == ["a", "b"] and s.pinned_blocks == 20
    turn("c")  # 30 blocks > 25: a, the least recently pinned, goes
    assert order() == ["b", "c"] and s.pinned_blocks == 20 and s.released["budget"] == 1
    assert all(b.ref_cnt == 0 for b in held["a"]) and all(b.ref_cnt == 1 for b in held["b"])
    turn("b", more=40)  # b's next turn: its pin released at the start, 12 blocks pinned at the finish, newest
    assert order() == ["c", "b"] and s.pinned_blocks == 22 and s.released == {"turn": 1, "budget": 1, "shortage": 0}
    turn("d")  # 32 > 25: c goes, not b
    assert order() == ["b", "d"] and s.pinned_blocks == 22 and s.released["budget"] == 2


def test_unnamed_requests_are_never_pinned(tiny_model_dir):
    from kvsched.bench.sched_floor import FLOOR_SCHEDULER

    s, f = build(tiny_model_dir, FLOOR_SCHEDULER, num_blocks=64)
    serve(s, [f.make(tokens(10_000, 10 * BLOCK), 1)])
    assert not s.pins and not s.refs and not s.session_of


def test_a_failed_pin_still_frees_the_request(tiny_model_dir, monkeypatch):
    from kvsched.adapters.vllm.harness import free_blocks, usable_blocks
    from kvsched.bench.sched_floor import FLOOR_SCHEDULER, FloorScheduler

    def broken(self, key, request):
        raise RuntimeError("pin failed")

    monkeypatch.setattr(FloorScheduler, "_pin", broken)
    s, f = build(tiny_model_dir, FLOOR_SCHEDULER, num_blocks=64)
    with pytest.raises(RuntimeError, match="pin failed"):
        serve(s, [f.make(tokens(10_000, 10 * BLOCK), 1, session_id="a")])
    assert not s.requests and free_blocks(s) == usable_blocks(s)  # vLLM freed it: no block held


def pool_state(s) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """vLLM's reference count of every block, its free queue (block ids, evicted first) and each pin's block ids."""
    from kvsched.adapters.vllm import compat

    pool = compat.block_pool(s)
    pins = {k.session_id: [b.block_id for b in blocks] for k, blocks in s.pins.items()}
    return ([b.ref_cnt for b in pool.blocks], [b.block_id for b in pool.free_block_queue.get_all_free_blocks()], pins)


def assert_refs_are_the_pins(s) -> None:
    from collections import Counter

    held = Counter(b.block_id for blocks in s.pins.values() for b in blocks)
    assert dict(s.refs.items()) == dict(held) and s.pinned_blocks == len(held)


def test_incremental_pins_leave_vllm_as_the_whole_release_does(tiny_model_dir, monkeypatch):
    """Serial turns with partial hits, branches (a turn sharing the session's older prefix, not its pin's tail) and
    budget releases: after every turn vLLM's reference counts, its free queue and the pins equal the floor's, and
    while a turn runs the incremental pin is exactly the blocks the request hit."""
    from kvsched.adapters.vllm.harness import step
    from kvsched.bench.sched_floor import FLOOR_INC_SCHEDULER, FLOOR_SCHEDULER

    monkeypatch.setenv("KVSCHED_PIN_BUDGET_FRACTION", "0.1")  # of 255 usable blocks: 25
    (whole, fw), (inc, fi) = (build(tiny_model_dir, cls, num_blocks=256)
                              for cls in (FLOOR_SCHEDULER, FLOOR_INC_SCHEDULER))
    base = {sid: tokens(10_000 * (i + 1), 10 * BLOCK) for i, sid in enumerate("abcd")}
    turns = [("a", base["a"]), ("b", base["b"][:8 * BLOCK]),
             ("a", base["a"][:6 * BLOCK] + tokens(90_000, 40)),  # a branch at block 6: the pin's last 4 unhit
             ("a", base["a"] + tokens(91_000, 20)),  # back on the older prefix: 10 blocks hit, the branch's 2 not
             ("c", base["c"]),  # 10 + 8 + 10 > 25: b, the least recently pinned, goes
             ("a", base["a"] + tokens(91_000, 20) + tokens(92_000, 3 * BLOCK)),  # the whole pin hit, 4 blocks more
             ("d", base["d"][:9 * BLOCK]), ("c", base["c"][:3 * BLOCK] + tokens(93_000, 50)),
             ("b", base["b"]), ("a", base["a"][:2 * BLOCK])]
    kept: list[tuple[int, int]] = []  # (blocks kept pinned, blocks hit) at each turn's start
    for n, (sid, prompt) in enumerate(turns):
        rw, ri = fw.make(prompt, 2, session_id=sid), fi.make(prompt, 2, session_id=sid)
        whole.add_request(rw)
        inc.add_request(ri)
        outs = [step(s)[0] for s in (whole, inc)]
        hits = [int(o.scheduled_new_reqs[0].num_computed_tokens) for o in outs]
        assert hits[0] == hits[1], n
        pin = next((blocks for k, blocks in inc.pins.items() if k.session_id == sid), [])
        held = inc.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[ri.request_id]
        assert pin == held[:len(pin)] and len(pin) <= hits[1] // BLOCK, n  # the blocks it hit, no other
        assert all(b.ref_cnt == 2 for b in pin), n  # the pin's and the request's
        kept.append((len(pin), hits[1] // BLOCK))
        assert_refs_are_the_pins(inc)
        serve(whole, [])
        serve(inc, [])
        assert pool_state(whole) == pool_state(inc), n
        assert_refs_are_the_pins(inc)
        assert_refs_are_the_pins(whole)
    assert whole.released["budget"] > 0 and inc.released["budget"] == whole.released["budget"]
    assert inc.released["turn"] > 0
    assert (6, 6) in kept and (6, 10) in kept  # a partial hit (the pin's unhit tail went) and a branch (10 hit, 6 kept)
