"""The per-step paths kvsched adds to vLLM's scheduler: shared objects instead of per-request ones, in-place pins, and
the allocation wrapper's retry whichever way vLLM passes its arguments."""

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402
from kvsched.adapters.vllm.harness import (  # noqa: E402
    KVSCHED_SCHEDULER,
    HarnessConfig,
    RequestFactory,
    build_scheduler,
    run_until_idle,
)
from kvsched.core.sessions import TurnHints  # noqa: E402

BLOCK = 16


def _req(session_id="s", salt=None, **extra):
    return SimpleNamespace(session_id=session_id, cache_salt=salt,
                           sampling_params=SimpleNamespace(extra_args=extra or None))


def test_hints_are_shared_per_role_and_fresh_when_a_turn_carries_ttl_or_end():
    _, a = compat.request_session(_req(agent_role="worker"))
    _, b = compat.request_session(_req(session_id="t", agent_role="Worker"))
    assert a is b and a == TurnHints(role="worker")
    _, none1 = compat.request_session(_req())
    _, none2 = compat.request_session(_req(session_id=None))
    assert none1 is none2 == TurnHints()
    key, c = compat.request_session(_req(agent_role="worker", ttl_s="2.5", session_end="1"))
    assert c == TurnHints(role="worker", ttl_s=2.5, end=True) and key.session_id == "s"
    assert compat.request_session(_req(agent_role="not a role!")) == (None, TurnHints())


def test_a_role_remembered_as_sent_gives_the_validated_role_and_a_bad_one_is_refused_every_time():
    """The hints are looked up by the role as sent before it is validated: the lookup must give what validation
    would, and never remember a value validation refuses ("İ" lowers to "i" and a combining dot)."""
    for _ in range(2):
        _, upper = compat.request_session(_req(agent_role="CRITIC"))
        _, lower = compat.request_session(_req(agent_role="critic"))
        assert upper is lower and upper == TurnHints(role="critic")
        assert compat.request_session(_req(agent_role="\u0130")) == (None, TurnHints())
        assert compat.request_session(_req(agent_role=["worker"])) == (None, TurnHints())


def test_allocation_retries_on_shortage_with_positional_or_keyword_arguments():
    calls, shortages = [], []
    results = iter([None, "blocks", None, "blocks2"])
    block = lambda ref_cnt: SimpleNamespace(ref_cnt=ref_cnt)  # noqa: E731
    hits = SimpleNamespace(blocks=([block(0), block(2), block(0)],))  # two of its hits sit in the free queue

    def allocate(request, num_new_tokens, num_new_computed_tokens=0, new_computed_blocks=None,
                 num_lookahead_tokens=0):
        calls.append((request, num_new_tokens, num_lookahead_tokens))
        return next(results)

    sched = SimpleNamespace(kv_cache_manager=SimpleNamespace(allocate_slots=allocate))
    compat.wrap_allocate_slots(sched, lambda r, n, free_hits: shortages.append((r, n, free_hits)) or True)
    compat.wrap_allocate_slots(sched, lambda r, n, free_hits: False)  # idempotent: the first wrapper stays
    assert sched.kv_cache_manager.allocate_slots("r1", 5, 48, hits, num_lookahead_tokens=1) == "blocks"
    assert sched.kv_cache_manager.allocate_slots(request="r2", num_new_tokens=7) == "blocks2"
    assert shortages == [("r1", 5, 2), ("r2", 7, 0)]
    assert calls == [("r1", 5, 1), ("r1", 5, 1), ("r2", 7, 0), ("r2", 7, 0)]


def test_free_hits_are_counted_again_before_every_retry():
    """A shortage that releases the request's own session's pin puts its prefix-cache hits in the free queue; vLLM
    counts them against the free blocks on the retry, so the hook must be told (the simulator always was; found by
    tests/sim/test_apply_equivalence.py)."""
    hit = SimpleNamespace(ref_cnt=1)  # held by the session's pin
    results, seen = iter([None, None, "blocks"]), []

    def allocate(request, num_new_tokens, num_new_computed_tokens=0, new_computed_blocks=None):
        return next(results)

    def on_shortage(request, num_new_tokens, free_hits):
        seen.append(free_hits)
        hit.ref_cnt = 0  # the pin went
        return True

    sched = SimpleNamespace(kv_cache_manager=SimpleNamespace(allocate_slots=allocate))
    compat.wrap_allocate_slots(sched, on_shortage)
    assert sched.kv_cache_manager.allocate_slots("r", 5, 16, SimpleNamespace(blocks=([hit],))) == "blocks"
    assert seen == [0, 1]


def test_one_key_object_per_session_and_partial_releases_trim_the_pin_in_place(tiny_model_dir, clock):
    s = build_scheduler(KVSCHED_SCHEDULER, HarnessConfig(model_dir=tiny_model_dir, num_blocks=64, block_size=BLOCK,
                                                         max_model_len=1024))
    s.kvsched.policy.clock = clock
    f = RequestFactory(BLOCK)
    s.add_request(f.make(list(range(90)), 20, session_id="a"))
    run_until_idle(s)
    [key] = s.kvsched.pinned
    [pin] = s.kvsched.pinned[key]
    assert len(pin) == 6  # 90 prompt + 19 generated tokens with KV
    # continues the prompt (its 5 full blocks), not the generated tokens: hits 5 of the 6 pinned blocks
    second = f.make(list(range(90)) + [9] * 30, 5, session_id="a")
    s.add_request(second)
    assert s.kvsched.requests[second.request_id][0] is key  # the session's key object, not a new one per request
    s.schedule()
    assert s.kvsched.pinned[key][0] is pin and len(pin) == 5  # the unhit tail went; the same list, trimmed
    assert set(s.kvsched.block_refs) == {b.block_id for b in pin}


def test_a_known_session_returns_its_key_object_and_hints_are_still_checked():
    from kvsched.core.sessions import SessionId, SessionKey

    seen = SessionKey(SessionId("s"), "salt")  # no tenant: a request without kvsched_tenant
    known = {seen: seen}.get
    key, hints = compat.request_session(_req(salt="salt", agent_role="planner"), known)
    assert key is seen and hints == TurnHints(role="planner")
    key, _ = compat.request_session(_req(session_id="other", salt="salt"), known)
    assert key == SessionKey(SessionId("other"), "salt") and key is not seen
    assert compat.request_session(_req(salt="salt", ttl_s=-1), known) == (None, TurnHints())
    assert compat.request_session(_req(session_id=" s", salt="salt"), known) == (None, TurnHints())
    assert compat.request_session(_req(session_id=7), known) == (None, TurnHints())


def test_with_vllm_0_32s_signature_the_wrapper_passes_arguments_by_position_and_still_retries():
    """The fast wrapper (taken only for allocate_slots' exact 0.32 parameters) must pass every argument on, in place,
    and count the connector's external tokens and the free hits on a shortage like the generic one."""
    calls, shortages = [], []
    results = iter([None, "blocks"])
    hits = SimpleNamespace(blocks=([SimpleNamespace(ref_cnt=0), SimpleNamespace(ref_cnt=1)],))

    def allocate(request, num_new_tokens, num_new_computed_tokens=0, new_computed_blocks=None, num_lookahead_tokens=0,
                 num_external_computed_tokens=0, delay_cache_blocks=False, num_encoder_tokens=0,
                 full_sequence_must_fit=False, reserved_blocks=0, has_scheduled_reqs=True, skip_zeroing_group_ids=()):
        calls.append((request, num_new_tokens, num_new_computed_tokens, new_computed_blocks, num_lookahead_tokens,
                      num_external_computed_tokens, delay_cache_blocks, num_encoder_tokens, full_sequence_must_fit,
                      reserved_blocks, has_scheduled_reqs, skip_zeroing_group_ids))
        return next(results)

    sched = SimpleNamespace(kv_cache_manager=SimpleNamespace(allocate_slots=allocate))
    compat.wrap_allocate_slots(sched, lambda r, n, free_hits: shortages.append((r, n, free_hits)) or True)
    wrapped = sched.kv_cache_manager.allocate_slots
    assert wrapped.__name__ == "allocate_slots_032"
    assert wrapped("r", 5, num_new_computed_tokens=32, new_computed_blocks=hits, num_lookahead_tokens=2,
                   num_external_computed_tokens=16, delay_cache_blocks=True, num_encoder_tokens=7,
                   full_sequence_must_fit=True, reserved_blocks=3, has_scheduled_reqs=False,
                   skip_zeroing_group_ids=(1,)) == "blocks"
    assert shortages == [("r", 21, 1)]
    assert calls == [("r", 5, 32, hits, 2, 16, True, 7, True, 3, False, (1,))] * 2


def test_the_engines_allocate_slots_gets_the_positional_wrapper(tiny_model_dir):
    """vLLM 0.32's KVCacheManager.allocate_slots has the parameters the fast wrapper names (else the generic one)."""
    s = build_scheduler(KVSCHED_SCHEDULER, HarnessConfig(model_dir=tiny_model_dir, num_blocks=64, block_size=BLOCK,
                                                         max_model_len=1024))
    assert s.kv_cache_manager.allocate_slots.__name__ == "allocate_slots_032"
