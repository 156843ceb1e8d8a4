"""Session ids that print alike must not be two sessions: found by review (review67), an id holding a bidi override
(U+202E), a zero-width space (U+200B) or a line separator (U+2028) was accepted, so `wf-1` and `wf-1` + U+200B were two
sessions listed, logged and deleted under what reads as one name, and U+202E reverses what a log line shows after it.
Such characters (Unicode categories Cf, Zl, Zp) are refused like control characters: HTTP 400 through every entry
point, since each reads the id through `validate_session_id`. Visible non-ASCII ids (accents, CJK, emoji) still pass,
and so do joiners inside a visible sequence (review68: tests/core/test_session_id_visible_sequences.py)."""

from __future__ import annotations

import re

import pytest

from kvsched.core.client_fields import read_session_fields
from kvsched.core.sessions import InvalidSessionInput, validate_session_id

INVISIBLE = ["wf-1\u200b", "a\u202eb", "a\u2066b\u2069", "a\u200db", "\ufeffwf", "a\u2028b", "a\u2029b", "x\u00ady"]
VISIBLE = ["café", "日本", "агент-7", "wf 😀", "e\u0301"]


@pytest.mark.parametrize("bad", INVISIBLE)
def test_an_id_with_an_invisible_or_line_separating_character_is_refused_naming_it(bad):
    odd = next(ch for ch in bad if not ch.isalnum() and ch not in "-")
    with pytest.raises(InvalidSessionInput, match=re.escape(f"U+{ord(odd):04X}")):
        validate_session_id(bad)


@pytest.mark.parametrize("good", VISIBLE)
def test_visible_non_ascii_ids_still_pass(good):
    assert validate_session_id(good) == good


@pytest.mark.parametrize("where", ["body", "header"])
def test_the_request_fields_refuse_it_from_the_body_and_the_header(where):
    payload = {"session_id": "wf-1\u200b"} if where == "body" else {}
    headers = {"x-session-id": "wf-1\u200b"} if where == "header" else {}
    with pytest.raises(InvalidSessionInput, match="U\\+200B"):
        read_session_fields(payload, headers)
