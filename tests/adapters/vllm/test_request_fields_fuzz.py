"""Hypothesis over the pure parsing of a request's session fields (`client_fields`, `request_fields`): whatever JSON
and headers a client sends, the answer is the fields or an InvalidSessionInput naming one (a 400), never another
exception (a 500); what is accepted is valid; the canonical rewrite is a fixed point; the byte search that lets a body
skip the parse (`needs_scan`) never skips one the check would refuse; the engine reads `kvsched_infer` as checked."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.request_fields import (
    SESSION_ROUTES,
    ResponseSessions,
    apply_session_fields,
    check_unhandled_body,
    needs_scan,
)
from kvsched.core.client_fields import read_session_fields, validate_infer
from kvsched.core.sessions import InvalidSessionInput, validate_role, validate_session_id

TEXT = st.text(max_size=12) | st.sampled_from(["5m", "1h", "24h", "in_memory", "0", "1", "true", "no", "Worker",
                                               "ephemeral", " s ", "a/../b", "%2F", "\x00", "\ud800", "x" * 130])
SCALAR = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
          | TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                    max_leaves=8)
KEYS = ["session_id", "prompt_cache_key", "previous_response_id", "safety_identifier", "user", "metadata",
        "prompt_cache_options", "prompt_cache_retention", "cache_salt", "request_id", "messages", "system", "tools"]
XARG_KEYS = ["session_id", "agent_role", "ttl_s", "session_end", "compaction", "kvsched_infer", "kvsched_tenant",
             "kvsched_compacted", "kvsched_conversation", "other"]
CONTROL = st.fixed_dictionaries({}, optional={"type": st.just("ephemeral") | TEXT, "ttl": SCALAR}) | JSON
BLOCKS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}, optional={"cache_control": CONTROL}),
                  max_size=2)
PAYLOAD = st.fixed_dictionaries({}, optional={
    **{k: SCALAR | JSON for k in KEYS},
    "metadata": st.fixed_dictionaries({}, optional={"user_id": SCALAR}) | JSON,
    "prompt_cache_options": st.fixed_dictionaries({}, optional={"ttl": SCALAR}) | JSON,
    "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": TEXT | BLOCKS}), max_size=2),
    "vllm_xargs": st.dictionaries(st.sampled_from(XARG_KEYS), SCALAR | JSON, max_size=4) | JSON})
HEADER_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["1", "0", "-1", "nan", "1e400", "worker", "WORKER", "", "x" * 200, "１２", "1_000"])
HEADERS = st.dictionaries(st.sampled_from(["x-session-id", "x-agent-role", "x-session-ttl", "x-session-end"]),
                          HEADER_TEXT, max_size=4)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(payload=PAYLOAD, headers=HEADERS)
def test_read_session_fields_answers_fields_or_a_named_400(payload: dict[str, Any], headers: dict[str, str]) -> None:
    try:
        fields = read_session_fields(payload, headers, lambda _r: None)
    except InvalidSessionInput as exc:
        assert isinstance(exc.field, str) and exc.field and len(str(exc)) <= 400
        return
    if fields.session_id is not None:
        assert validate_session_id(fields.session_id) == fields.session_id and fields.source
    if fields.ttl_s is not None:
        assert math.isfinite(fields.ttl_s) and fields.ttl_s >= 0 and fields.ttl_source
    if fields.role is not None:
        assert validate_role(fields.role) == fields.role


@FUZZ
@given(payload=PAYLOAD, headers=HEADERS, tenant=st.sampled_from([None, "t1"]),
       path=st.sampled_from(["/v1/chat/completions", "/v1/responses", "/v1/messages"]))
def test_the_canonical_rewrite_is_a_fixed_point(payload: dict[str, Any], headers: dict[str, str], tenant: str | None,
                                                path: str) -> None:
    """What the middleware forwards, read again (as a retry through another kvsched replica would), changes nothing
    and is refused for nothing."""
    responses = ResponseSessions()
    try:
        apply_session_fields(payload, headers, tenant, path, responses)
    except InvalidSessionInput as exc:
        assert exc.field
        return
    json.dumps(payload)  # still JSON (NaN as Python writes it, as it came)
    xargs = payload.get("vllm_xargs")
    if not isinstance(xargs, dict) or xargs.get("session_id") is None:
        return  # a TTL for session inference is written without an id, which a client may not send itself
    again = json.loads(json.dumps(payload))
    assert apply_session_fields(again, {}, tenant, path, responses) is False
    assert again == json.loads(json.dumps(payload))


def dumps(value: Any, escaped: frozenset[str], ascii_only: bool) -> str:
    """JSON text of `value` with the characters in `escaped` written as `\\u00XX` wherever they occur in a string (a
    key spelled `\\u006bvsched_tenant` is the key `kvsched_tenant` to any JSON parser)."""
    if isinstance(value, str):
        return '"' + "".join(f"\\u{ord(c):04x}" if c in escaped else json.dumps(c, ensure_ascii=ascii_only)[1:-1]
                             for c in value) + '"'
    if isinstance(value, dict):
        return "{" + ",".join(f"{dumps(str(k), escaped, ascii_only)}:{dumps(v, escaped, ascii_only)}"
                              for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v, escaped, ascii_only) for v in value) + "]"
    return json.dumps(value)


@FUZZ
@given(payload=PAYLOAD | st.lists(PAYLOAD, max_size=2) | JSON, session_header=st.booleans(),
       tenant=st.sampled_from([None, "t1"]), ascii_only=st.booleans(),
       escaped=st.frozensets(st.sampled_from("kvschedtnaipu_ro"), max_size=3),
       route=st.sampled_from([*sorted(SESSION_ROUTES), "/v1/embeddings", "/pooling"]))
def test_the_byte_search_never_skips_a_body_the_check_refuses(payload: Any, session_header: bool, tenant: str | None,
                                                              ascii_only: bool, escaped: frozenset[str],
                                                              route: str) -> None:
    try:
        body = dumps(payload, escaped, ascii_only).encode("utf-8", "surrogatepass")
    except (ValueError, UnicodeEncodeError):
        return
    headers = {"x-session-id": b"s"} if session_header else {}
    try:
        check_unhandled_body(json.loads(body), headers, tenant, route)
    except InvalidSessionInput as exc:
        assert exc.field
        assert needs_scan(body, tenant, route, session_header), (route, body[:300])


@given(value=SCALAR | JSON)
def test_the_engine_reads_kvsched_infer_as_the_api_server_checks_it(value: Any) -> None:
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={compat.XARG_INFER: value}), cache_salt=None)
    try:
        checked = validate_infer(value)
    except InvalidSessionInput as exc:
        assert exc.field == "vllm_xargs.kvsched_infer"
        return
    assert compat.request_scope(request)[2] is (True if checked is None else checked)


@pytest.mark.parametrize("value", [0, "0", False, "false", "no", " FALSE "])
def test_every_way_to_opt_out_of_inference_reaches_the_engine_as_an_opt_out(value: Any) -> None:
    payload = {"messages": [], "vllm_xargs": {compat.XARG_INFER: value}}
    apply_session_fields(payload, {}, "t")
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=payload["vllm_xargs"]), cache_salt=None)
    assert compat.request_scope(request)[2] is False
