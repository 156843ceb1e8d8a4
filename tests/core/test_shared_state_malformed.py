"""What the shared store holds is decoded totally (found by review, /tmp/rev_store r1, r2, r5): a malformed session
metadata value or compaction checkpoint is absent or dropped, never an exception; session metadata keys keep a
session's branches, inferred sessions and client sessions apart."""

from __future__ import annotations

import json

import pytest

from kvsched.core import shared_state
from kvsched.core.shared_state import SessionMeta, decode_checkpoints, session_key

GOOD_CP = {"digest": "a" * 64, "replaced": 3, "system_count": 1, "summary": "s", "summary_tokens": 4, "root": ""}
MALFORMED_META = {
    "not UTF-8": b"\xff\xfe\x00garbage",
    "turns 1e999": b'{"role":null,"ttl_s":null,"turns":1e999,"replica":"A","blocks":0}',
    "blocks Infinity": b'{"turns":1,"replica":"A","blocks":Infinity}',
    "turns NaN": b'{"turns":NaN,"replica":"A"}',
    "nested past the recursion limit": b"[" * 100_000 + b"]" * 100_000,
    "a list": b"[1, 2]",
    "negative blocks": b'{"turns":1,"replica":"A","blocks":-5}',
    "a 5000-digit int": b'{"turns":' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("raw", MALFORMED_META.values(), ids=MALFORMED_META.keys())
def test_malformed_session_metadata_decodes_to_none(raw: bytes) -> None:
    assert SessionMeta.decode(raw) is None


def test_well_formed_session_metadata_still_decodes() -> None:
    meta = SessionMeta(role="coder", ttl_s=30.0, turns=2, replica="a", blocks=7)
    assert SessionMeta.decode(meta.encode()) == meta and SessionMeta.decode(meta.encode().encode()) == meta


MALFORMED_CHECKPOINTS = {
    "not UTF-8": b"\xff[]",
    "replaced 1e999": json.dumps([dict(GOOD_CP, replaced=1e999)]).encode(),
    "summary_tokens Infinity": json.dumps([dict(GOOD_CP, summary_tokens=float("inf"))]).encode(),
    "summary_tokens negative": json.dumps([dict(GOOD_CP, summary_tokens=-1)]).encode(),
    "nested": b"[" * 50_000 + b"]" * 50_000,
    "an object": b'{"digest": "x"}',
}


@pytest.mark.parametrize("raw", MALFORMED_CHECKPOINTS.values(), ids=MALFORMED_CHECKPOINTS.keys())
def test_malformed_checkpoints_are_dropped_and_counted(raw: bytes) -> None:
    assert decode_checkpoints(raw) == []
    assert shared_state.checkpoint_rows(raw) == ([], 1)


def test_a_bad_row_is_dropped_and_the_good_ones_kept() -> None:
    raw = json.dumps([dict(GOOD_CP, replaced=1e999), GOOD_CP, "junk"])
    rows, bad = shared_state.checkpoint_rows(raw)
    assert [cp.replaced for cp in rows] == [3] and bad == 2


def test_session_metadata_keys_keep_inferred_sessions_apart() -> None:
    """Found by review: replica a's inferred `inferred-1`, replica b's and a client's session named `inferred-1`
    shared one key."""
    client = session_key("m", "inferred-1", None)
    keys = {client, session_key("m", "inferred-1", None, inferred="a"),
            session_key("m", "inferred-1", None, inferred="b"), session_key("m", "inferred-1", None, "t", inferred="a")}
    assert len(keys) == 4
    assert client == session_key("m", "inferred-1", None, None, None)  # a client session keeps its key
