"""compat's readers hand the mypyc-compiled bookkeeping Python ints, floats and bools, whatever number types vLLM's
objects (or a connector, or an offline caller) hold: a compiled function refuses a numpy integer or a float where it
says `int` (TypeError, the engine step down), where pure Python took it. Fakes stand for vLLM's objects; the checks
are exact types, so they hold in pure mode too (a dropped `int(...)` fails here before it reaches an engine)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from kvsched.adapters.vllm import compat

# An integral count as vLLM, numpy or a JSON decoder may spell it.
_COUNT = st.integers(1, 10_000).flatmap(lambda n: st.sampled_from([n, np.int64(n), np.int32(n), np.uint32(n)]))
_HINT = st.one_of(st.none(), st.integers(0, 10**6), st.floats(0, 1e6), st.integers(0, 10**6).map(np.int64),
                  st.floats(0, 1e6, width=32).map(np.float32), st.booleans(), st.booleans().map(np.bool_),
                  st.sampled_from(["1.5", "3e1", "30", "0", "1", "true", "no"]))


def _scheduler(blocks, block_size, hash_size=None):
    pool = SimpleNamespace(num_gpu_blocks=blocks, get_num_free_blocks=lambda: blocks)
    return SimpleNamespace(kv_cache_manager=SimpleNamespace(block_pool=pool), hash_block_size=hash_size,
                           cache_config=SimpleNamespace(block_size=block_size))


@given(blocks=_COUNT, block_size=_COUNT, hash_size=st.one_of(st.none(), _COUNT))
def test_pool_sizes_are_python_ints(blocks, block_size, hash_size):
    s = _scheduler(blocks, block_size, hash_size)
    for value in (compat.num_total_blocks(s), compat.num_free_blocks(s), compat.hash_block_size(s)):
        assert type(value) is int


@given(n=st.integers(0, 50), size=_COUNT, hashed=st.one_of(st.none(), _COUNT))
def test_a_pins_token_count_is_a_python_int(n, size, hashed):
    blocks = [SimpleNamespace(block_hash_num_tokens=hashed) for _ in range(n)]
    assert type(compat.block_tokens(blocks, size)) is int


@given(prompt=_COUNT, output=_COUNT, offset=_COUNT, length=_COUNT, block=st.integers(1, 64))
def test_a_requests_ranges_and_anchor_are_python_ints(prompt, output, offset, length, block):
    feature = SimpleNamespace(mm_position=SimpleNamespace(offset=offset, length=length))
    request = SimpleNamespace(num_prompt_tokens=prompt, num_output_tokens=output, prompt_embeds=None,
                              mm_features=[feature], block_hashes=[b"h%d" % i for i in range(200)])
    for lo, hi in compat.opaque_ranges(request):
        assert type(lo) is int and type(hi) is int
    request.prompt_embeds = object()
    assert all(type(x) is int for r in compat.opaque_ranges(request) for x in r)
    anchor, _ = compat.finish_anchor(request, block)
    assert anchor is None or type(anchor[0]) is int
    assert all(type(x) is int for x in compat.finished_request_shape(
        SimpleNamespace(**vars(request), all_token_ids=[]), block)[:2])


@given(ttl=_HINT, end=_HINT, role=st.one_of(st.none(), st.sampled_from(["worker", "Planner", 5, np.str_("critic")])))
def test_a_requests_hints_are_exactly_what_the_compiled_turn_hints_hold(ttl, end, role):
    """`TurnHints(role: str | None, ttl_s: float | None, end: bool)` is a compiled class: its checks are exact (a
    numpy float32 TTL or a numpy bool end is refused), so compat gives it Python floats and bools, or no session."""
    extra = {k: v for k, v in (("session_id", "s"), ("ttl_s", ttl), ("session_end", end), ("agent_role", role))
             if v is not None}
    key, hints = compat.request_session(SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra)))
    assert hints.ttl_s is None or type(hints.ttl_s) is float
    assert type(hints.end) is bool and (hints.role is None or isinstance(hints.role, str))
    if key is not None:
        assert type(key.branch) is int and type(key.inferred) is bool
