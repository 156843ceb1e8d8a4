"""Numbers of every type a client or vLLM can hand the scheduler hooks, run against the mypyc-compiled bookkeeping.

mypyc checks annotations at run time: a float or a numpy integer passed where a compiled function says `int` raises
TypeError, which pure Python accepted, and a TypeError in a scheduler hook takes vLLM's engine down. These tests run
only where the compiled build is in use (`make ext`, or `setup.py build_ext --inplace` in a worktree): in pure mode
nothing they guard can fail."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")

from kvsched import compiled  # noqa: E402
from kvsched.adapters.vllm.harness import (  # noqa: E402
    RequestFactory,
    free_blocks,
    run_until_idle,
    usable_blocks,
)
from kvsched.core.sessions import InvalidSessionInput, validate_end_flag, validate_role, validate_ttl  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402
from tests.conftest import FakeClock  # noqa: E402

pytestmark = pytest.mark.skipif(compiled.mode != "compiled", reason=f"kvsched runs {compiled.mode!r}: these guard "
                                "the mypyc build's run-time type checks (`make ext` builds it)")


def _pinned_session(s, f, n_sessions: int = 3) -> None:
    for i in range(n_sessions):
        s.add_request(f.make([100 + i] * 300, 4, session_id=f"s{i}"))
        run_until_idle(s)


@pytest.mark.parametrize("num_new, external", [(np.int64(600), np.int64(0)), (500, np.int64(100)),
                                             (np.int32(500), np.int64(100))])
def test_a_shortage_counted_in_numpy_tokens_releases_pins_instead_of_crashing(harness_cfg, clock, num_new, external):
    """vLLM's `allocate_slots(request, num_new_tokens, ..., num_external_computed_tokens)` adds a KV connector's
    count, which a third-party connector may compute in numpy (vLLM's own code takes it: stock vLLM allocates). Before
    the fix the wrapper handed the sum as is to the compiled `PinApplier.on_shortage(num_new_tokens: int)`: TypeError
    ("int object expected; got numpy.int64"), the engine down. (A float count fails in vLLM itself: `range(n)`.)"""
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    _pinned_session(s, f)
    pinned = s.kvsched.stats()["pinned_blocks"]
    assert pinned > 40 and free_blocks(s) < 600 // BLOCK  # the 600 tokens fit only once pins are released
    blocks = s.kv_cache_manager.allocate_slots(f.make([7] * 600, 4, session_id="big"), num_new,
                                               num_external_computed_tokens=external)
    assert blocks is not None and s.kvsched.stats()["pinned_blocks"] < pinned


# A value of each kind a JSON body, a msgpack'd utility call or an offline caller's `extra_args` can carry (vLLM's own
# check refuses integers outside int64/uint64 before the engine sees them).
_NUMBERS = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
    st.integers(-(2**31), 2**31 - 1).map(np.int64), st.floats(width=32, allow_nan=False).map(np.float32),
    st.floats(allow_nan=False).map(np.float64), st.booleans().map(np.bool_),
)
_VALUES = st.one_of(st.none(), _NUMBERS, st.sampled_from(["1.5", "30", "3e1", "true", "1", "0", "worker", "", "nan"]),
                    st.lists(st.integers(0, 3), max_size=2))


def _valid(validate, raw) -> bool:
    try:
        validate(raw)
    except InvalidSessionInput:
        return False
    return True


@pytest.fixture(scope="module")
def shared(harness_cfg):
    """One scheduler for every example (each uses its own session id and ends every session): building one per
    example took the test from seconds to minutes."""
    return _sched(harness_cfg, clock=FakeClock()), RequestFactory(BLOCK), itertools.count()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ttl=_VALUES, end=_VALUES, role=_VALUES, infer=_VALUES, prompt=st.integers(1, 200),
       max_tokens=st.integers(1, 40), shortage=_NUMBERS)
def test_hostile_numbers_in_every_hint_never_crash_a_hook_nor_leak_a_block(shared, ttl, end, role, infer, prompt,
                                                                          max_tokens, shortage):
    """The guard for the next such slip: hints of every numeric type (ints, floats, numpy scalars, bools, values at
    int64's edges) through the real hooks (add_request, schedule, finish, a shortage and the admin utility). Each
    request is served; it gets its session exactly when every hint passes the validators (which the API server's
    400s apply), with the TTL the policy derives from it; no block stays referenced once the sessions end."""
    s, f, ids = shared
    sid = f"h{next(ids)}"
    xargs = {k: v for k, v in (("ttl_s", ttl), ("session_end", end), ("agent_role", role), ("kvsched_infer", infer))
             if v is not None}
    try:
        request = f.make(list(range(1000, 1000 + prompt)), max_tokens, session_id=sid, xargs=xargs)
    except ValueError:  # vLLM's own SamplingParams check (VLLMValidationError): refused before any hook runs
        return
    s.add_request(request)
    run_until_idle(s)
    valid = ((ttl is None or _valid(validate_ttl, ttl)) and (end is None or _valid(validate_end_flag, end))
             and (not role or _valid(validate_role, role)))
    recs = [r for k, r in s.kvsched.policy.sessions.items() if k.session_id == sid]
    ended = end is not None and valid and validate_end_flag(end)
    assert len(recs) == (1 if valid and not ended else 0), (xargs, recs)
    if recs and recs[0].pinned_blocks:  # (a turn with no full block to pin leaves its record's TTL as it was)
        hint = validate_ttl(ttl) if ttl is not None else None
        policy = s.kvsched.policy  # the hint, capped at max_ttl_s and by the pin ledger once the pool has evicted
        assert recs[0].ttl_s == policy.payback.ttl(policy.config.ttl_for(hint))
    if isinstance(shortage, (int, np.integer)) and 1 <= shortage <= 4096:  # a count vLLM itself can allocate
        other = f.make([7] * 30, 2, session_id="x")
        s.kv_cache_manager.allocate_slots(other, shortage)  # released the pin, or nothing to release
        s.kv_cache_manager.free(other)
    s("end_all")  # (a request whose hints were refused was served without its id: maybe in an inferred session)
    assert free_blocks(s) == usable_blocks(s) and not s.kvsched.policy.sessions
