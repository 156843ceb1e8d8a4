"""The combined readers a turn's hooks call (`compat.prompt_view`, `finish_anchor`, `reusable_prefix` and the key
`request_session` builds) give exactly what the separate readers they stand for give, with the same Python types: they
are there to cut calls per turn (BENCHMARKS.md, "Per-turn readers at 256 sessions"), never to change a decision."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("vllm")

from vllm.v1.request import RequestStatus  # noqa: E402

from kvsched.adapters.vllm import compat  # noqa: E402
from kvsched.core.sessions import SessionId, SessionKey  # noqa: E402

_STATUS = st.sampled_from([None, RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED,
                           RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR])


@given(prompt=st.integers(0, 400), output=st.integers(0, 80), hashed=st.integers(0, 40), block=st.integers(1, 32),
       status=_STATUS)
def test_finish_anchor_is_the_last_computed_full_block_and_the_finish_status(prompt, output, hashed, block, status):
    request = SimpleNamespace(num_prompt_tokens=prompt, num_output_tokens=output,
                              block_hashes=[b"h%d" % i for i in range(hashed)])
    if status is not None:
        request.status = status
    anchor, normal = compat.finish_anchor(request, block)
    computed = max(prompt, prompt + output - 1)  # every token but the last sampled one (never fed back) has KV
    full = min(hashed, computed // block)  # full blocks computed, of those the request hashed
    assert anchor == ((full - 1, b"h%d" % (full - 1)) if full else None)
    assert normal == (status not in (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR))
    assert anchor is None or type(anchor[0]) is int


@given(kind=st.sampled_from(["text", "none", "images", "embeds"]), n=st.integers(0, 40), hashed=st.integers(0, 3))
def test_prompt_view_is_the_hashes_tokens_and_opaque_ranges(kind, n, hashed):
    features = [SimpleNamespace(mm_position=SimpleNamespace(offset=2, length=5))] if kind == "images" else None
    request = SimpleNamespace(block_hashes=[b"h%d" % i for i in range(hashed)] or None, num_prompt_tokens=n,
                              prompt_token_ids=None if kind in ("embeds", "none") else list(range(n)),
                              prompt_embeds=object() if kind == "embeds" else None, mm_features=features)
    hashes, tokens, opaque = compat.prompt_view(request)
    assert hashes == compat.prompt_block_hashes(request) and tokens is request.prompt_token_ids
    assert opaque == compat.opaque_ranges(request)


def _block(i, state):
    """A fake KVCacheBlock: "full" (hashed, covering its tokens from position 0), "unhashed" or "null"."""
    return SimpleNamespace(block_id=i, is_null=state == "null", block_hash=b"h%d" % i if state == "full" else None,
                           block_hash_num_tokens=(i + 1) * 16 if state == "full" else None)


@given(states=st.lists(st.sampled_from(["full", "full", "full", "unhashed", "null"]), max_size=12),
       known=st.booleans(), recorded=st.booleans())
def test_reusable_prefix_is_the_prefix_blocks_and_their_tokens(states, known, recorded):
    blocks = [_block(i, s) for i, s in enumerate(states)]
    if not recorded:  # a fast path's own reading of the count, not the hash's: `block_tokens` falls back to the run
        for b in blocks:
            b.block_hash_num_tokens = None
    manager = SimpleNamespace(req_to_blocks={"r": blocks} if known else {})
    scheduler = SimpleNamespace(kv_cache_manager=SimpleNamespace(
        coordinator=SimpleNamespace(single_type_managers=(manager,))))
    request = SimpleNamespace(request_id="r")
    groups, tokens = compat.reusable_prefix(scheduler, 16)(request)
    want = compat.reusable_prefix_blocks(scheduler, request)
    assert groups == want and tokens == compat.block_tokens(want[0], 16) and type(tokens) is int
    if groups[0]:
        assert groups[0] is not blocks  # a copy: vLLM's own list is never the pin's


def test_a_named_requests_key_is_the_named_tuple_it_stands_for():
    request = SimpleNamespace(session_id=None, cache_salt="salt",
                              sampling_params=SimpleNamespace(extra_args={"session_id": "s1", "kvsched_tenant": "t"}))
    seen: list[SessionKey] = []

    def known(key):
        seen.append(key)
        return None

    key, _ = compat.request_session(request, known)
    want = SessionKey(SessionId("s1"), "salt", "t")
    assert key == want and seen == [want] and type(seen[0]) is SessionKey
    assert (seen[0].branch, seen[0].inferred) == (0, False) and hash(seen[0]) == hash(want)
