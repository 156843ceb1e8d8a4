"""Hypothesis over the headers, paths and bodies of every route kvsched touches, against the real server: never a 5xx,
never a dead engine, and no pin left behind once every session is ended."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.secure import ADMIN, KEYS, request, stats

pytestmark = pytest.mark.integration

# Header values: printable text incl. non-ASCII (sent as UTF-8), or raw bytes HTTP allows.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)
# field-value bytes (RFC 9110): visible ASCII, space, tab, obs-text; what else a client library refuses to send
ALLOWED = bytes([9, *range(0x20, 0x7F), *range(0x80, 0x100)])
RAW = st.binary(max_size=24).map(lambda b: bytes(c for c in b if c in ALLOWED).strip(b" \t"))
HEADER_VALUE = st.one_of(TEXT.map(lambda t: t.strip().encode()), RAW, st.sampled_from(
    [b"1", b"0", b"-1", b"nan", b"inf", b"1e400", b"summarize", b"cap", b"off", b"sliding_window", b"x" * 200]))
HEADERS = st.dictionaries(st.sampled_from(["X-Session-Id", "X-Agent-Role", "X-Session-TTL", "X-Session-End",
                                           "X-KVSched-Compaction", "X-KVSched-Cache-Salt"]),
                          HEADER_VALUE, max_size=4)
KEY = st.sampled_from([KEYS[0], KEYS[1], ADMIN, "wrong", None])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)
FIELD_VALUE = st.one_of(JSON, TEXT.filter(bool), TEXT.filter(bool),  # mostly strings, so that many requests run
                        st.sampled_from(["5m", "1h", "24h", "in_memory", "30m", "", "x" * 1100]))
SESSION_FIELDS = st.dictionaries(st.sampled_from([
    "session_id", "prompt_cache_key", "user", "safety_identifier", "previous_response_id", "prompt_cache_retention",
    "cache_salt", "metadata", "prompt_cache_options", "request_id"]), FIELD_VALUE, max_size=3)
XARGS = st.dictionaries(st.sampled_from(["session_id", "agent_role", "ttl_s", "session_end", "compaction",
                                         "kvsched_tenant", "kvsched_infer"]), FIELD_VALUE, max_size=3)
CONTENT = st.one_of(TEXT, st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": TEXT},
    optional={"cache_control": st.one_of(JSON, st.fixed_dictionaries({"type": st.just("ephemeral")},
                                                                      optional={"ttl": FIELD_VALUE}))}), max_size=2))


@st.composite
def generation(draw: Any) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"]))
    body: dict[str, Any] = {"model": "tiny", "max_tokens": draw(st.integers(1, 3))}
    if path == "/v1/completions":
        body["prompt"] = draw(TEXT) or "hi"
    elif path == "/v1/responses":
        body = {"model": "tiny", "input": draw(TEXT) or "hi", "max_output_tokens": 16}
    else:
        body["messages"] = [{"role": "user", "content": draw(CONTENT) or "hi"}]
        if path == "/v1/messages":
            body["system"] = draw(st.one_of(st.none(), CONTENT))
    body.update(draw(SESSION_FIELDS))
    if draw(st.booleans()):
        body["vllm_xargs"] = draw(st.one_of(XARGS, JSON))
    raw = json.dumps(body).encode()
    mangle = draw(st.sampled_from(["none", "none", "truncate", "deep", "junk"]))
    if mangle == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif mangle == "deep":
        raw = b"[" * draw(st.integers(100, 200_000))
    elif mangle == "junk":
        raw = draw(st.binary(max_size=64))
    return path, raw


ADMIN_PATH = st.one_of(
    st.just("/kvsched/sessions"),
    st.builds(lambda q: "/kvsched/sessions?" + q, st.sampled_from(
        ["limit=3", "limit=-1", "limit=x", "summary=1", "cursor=abc", "cursor=", "a=1&b=2", "limit=1&limit=2",
         "%ff=%fe", "limit=" + "9" * 50])),
    st.builds(lambda seg: "/kvsched/sessions/" + seg, st.text(
        st.sampled_from(list("abcxA/%.25Fé☕ ")), min_size=0, max_size=12).map(
            lambda t: "".join(c if c.isascii() else "%C3%A9" for c in t).replace(" ", "%20"))))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route=st.one_of(generation(), ADMIN_PATH.map(lambda p: (p, b""))), headers=HEADERS, key=KEY,
       method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]))
def test_fuzz_never_5xx_never_a_dead_engine(secure_server, route, headers, key, method):
    path, body = route
    if not path.startswith("/kvsched"):
        method = "POST"
    hdrs = {**headers, "Content-Type": b"application/json"}
    if key:
        hdrs["Authorization"] = f"Bearer {key}".encode()
    with httpx.Client(timeout=60) as client:
        r = client.request(method, secure_server.base + path, headers=hdrs, content=body)
    assert r.status_code < 500, (method, path, headers, body[:300], r.text[:500])
    assert request(secure_server, "GET", "/health", None).status_code == 200


def test_no_pin_is_left_behind_once_every_session_ends(secure_server):
    """After everything above (and the other tests on this server): the admin ends every session and every block is
    free again (no running request holds any)."""
    r = request(secure_server, "DELETE", "/kvsched/sessions", ADMIN)
    assert r.status_code == 200, r.text
    st_ = stats(secure_server)
    assert st_["pinned_blocks"] == 0 and st_["free_blocks"] == st_["total_blocks"]
    assert request(secure_server, "GET", "/kvsched/sessions?summary=1", ADMIN).json()["summary"]["sessions"] == 0
