"""The precedence of every session field (kvsched's, OpenAI's, Anthropic's) and the 400s that name the field."""

from __future__ import annotations

import pytest

from kvsched.core.client_fields import SessionFields, api_session_id, parse_duration, read_session_fields
from kvsched.core.sessions import InvalidSessionInput, SessionId


def read(payload, headers=None, previous=None):
    return read_session_fields(payload, headers or {}, previous or (lambda _r: None))


def ttl(payload, headers=None):
    f = read(payload, headers)
    return f.ttl_s, f.ttl_source


def test_kvsched_fields_come_first_then_prompt_cache_key_then_previous_response_then_user():
    full = {"prompt_cache_key": "pck", "previous_response_id": "resp_1", "safety_identifier": "safe", "user": "u",
            "metadata": {"user_id": "anth"}}
    prev = {"resp_1": SessionId("from-prev")}.get
    assert read(full, {"x-session-id": "hdr"}, prev).session_id == "hdr"
    assert read({**full, "vllm_xargs": {"session_id": "xa"}}, {}, prev).source == "vllm_xargs.session_id"
    assert read(full, {}, prev) == SessionFields("pck", "prompt_cache_key")
    del full["prompt_cache_key"]
    assert read(full, {}, prev).session_id == "from-prev"
    assert read(full, {}, lambda _r: None).session_id == "user:safe"  # an unknown response id names nothing
    del full["safety_identifier"]
    assert read(full).session_id == "user:u"
    del full["user"]
    assert read(full) == SessionFields("user:anth", "metadata.user_id")
    assert read({}) == SessionFields()


def test_kvsched_sources_must_agree():
    assert read({"session_id": "a", "vllm_xargs": {"session_id": "a"}}, {"x-session-id": "a"}).session_id == "a"
    with pytest.raises(InvalidSessionInput, match="conflicting") as info:
        read({"session_id": "a"}, {"x-session-id": "b"})
    assert info.value.field == "session_id"


def test_a_header_and_a_body_field_with_the_same_text_are_one_session():
    assert read({}, {"x-session-id": "café ☕"}).session_id == read({"prompt_cache_key": "café ☕"}).session_id


@pytest.mark.parametrize("payload, headers, field", [
    ({"prompt_cache_key": 5}, {}, "prompt_cache_key"),
    ({"prompt_cache_key": ""}, {}, "prompt_cache_key"),
    ({"user": "x" * 1025}, {}, "user"),
    ({"safety_identifier": ["a"]}, {}, "safety_identifier"),
    ({"metadata": {"user_id": 3}}, {}, "metadata.user_id"),
    ({"previous_response_id": {}}, {}, "previous_response_id"),
    ({"prompt_cache_retention": "forever"}, {}, "prompt_cache_retention"),
    ({"prompt_cache_options": {"ttl": "30 minutes"}}, {}, "prompt_cache_options.ttl"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x",
                                                  "cache_control": {"type": "ephemeral", "ttl": "2d"}}]}]},
     {}, "cache_control.ttl"),
    ({"system": [{"type": "text", "text": "s", "cache_control": {"type": "persistent"}}]}, {}, "cache_control"),
    ({}, {"x-session-id": "a\u0007"}, "X-Session-Id"),
    ({}, {"x-session-id": "ok", "x-session-ttl": "-1"}, "x-session-ttl"),
    ({"vllm_xargs": {"agent_role": "a b"}, "session_id": "s"}, {}, "vllm_xargs.agent_role"),
    ({"vllm_xargs": {"ttl_s": 3}}, {}, "session_id"),  # a TTL of kvsched's without a session
    ({}, {"x-session-end": "1"}, "session_id"),
    # found by review: each raised something other than InvalidSessionInput (a 500) or slipped through
    ({"prompt_cache_retention": ["24h"]}, {}, "prompt_cache_retention"),  # unhashable
    ({"prompt_cache_retention": {"a": 1}}, {}, "prompt_cache_retention"),
    ({"session_id": "s", "vllm_xargs": {"ttl_s": 10**400}}, {}, "vllm_xargs.ttl_s"),  # past float's range
    ({"session_id": "s", "vllm_xargs": {"ttl_s": 10**5000}}, {}, "vllm_xargs.ttl_s"),  # no repr either
    ({"session_id": "s", "vllm_xargs": {"agent_role": "\u0130"}}, {}, "vllm_xargs.agent_role"),  # "İ": i + U+0307
    ({"session_id": "a\ud800"}, {}, "session_id"),  # a lone surrogate: no UTF-8 carries it to the engine
    ({"prompt_cache_options": {"ttl": "\u00b2m"}}, {}, "prompt_cache_options.ttl"),  # float("²") fails
    ({"prompt_cache_options": {"ttl": "5m\n"}}, {}, "prompt_cache_options.ttl"),
    # found by review: float() took other scripts' digits, full-width ones and underscores; a wrong-type object passed
    ({}, {"x-session-id": "s", "x-session-ttl": "\u0661\u0662"}, "x-session-ttl"),
    ({}, {"x-session-id": "s", "x-session-ttl": "\uff15"}, "x-session-ttl"),
    ({"session_id": "s", "vllm_xargs": {"ttl_s": " 1_0 "}}, {}, "vllm_xargs.ttl_s"),
    ({}, {"x-session-id": "s", "x-session-ttl": "1_000"}, "x-session-ttl"),
    ({"prompt_cache_options": "x"}, {}, "prompt_cache_options"),
    ({"prompt_cache_options": [1]}, {}, "prompt_cache_options"),
])
def test_malformed_values_are_refused_naming_the_field(payload, headers, field):
    with pytest.raises(InvalidSessionInput) as info:
        read(payload, headers)
    assert info.value.field == field


def test_a_lower_precedence_field_is_still_checked():
    with pytest.raises(InvalidSessionInput) as info:
        read({"prompt_cache_key": "ok", "user": 7})
    assert info.value.field == "user"


def test_api_values_that_are_not_valid_ids_are_hashed_not_refused():
    long = api_session_id("", "k" * 300)
    assert long.startswith("sha256:") and len(long) == 39 and long == api_session_id("", "k" * 300)
    assert api_session_id("user:", "tab\there").startswith("user:sha256:")
    assert read({"prompt_cache_key": "k" * 300}).session_id == long


def test_ttl_precedence_and_values():
    anth = {"system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "q",
                                                        "cache_control": {"type": "ephemeral"}}]}]}
    assert ttl(anth) == (3600.0, "cache_control.ttl")  # the longest breakpoint
    both = {**anth, "prompt_cache_retention": "in_memory"}
    assert ttl(both) == (600.0, "prompt_cache_retention")
    assert ttl({**both, "prompt_cache_options": {"ttl": "30m"}}) == (1800.0, "prompt_cache_options.ttl")
    assert ttl({**both, "session_id": "s"}, {"x-session-ttl": "7"}) == (7.0, "X-Session-TTL")
    assert read({"prompt_cache_retention": "24h"}).ttl_s == 86_400.0
    # API TTL fields need no session id: they apply to the inferred session
    assert read({"prompt_cache_retention": "24h"}).session_id is None


@pytest.mark.parametrize("raw, seconds", [("5m", 300.0), ("1h", 3600.0), ("90s", 90.0), ("0.5h", 1800.0)])
def test_durations(raw, seconds):
    assert parse_duration(raw, "f") == seconds


def test_role_and_end():
    f = read({"session_id": "s", "vllm_xargs": {"agent_role": "Planner"}}, {"x-session-end": "true"})
    assert (f.role, f.end) == ("planner", True)


@pytest.mark.parametrize("payload, headers, field", [
    ({"vllm_xargs": {"agent_role": "planner"}}, {"x-agent-role": "worker"}, "x-agent-role"),
    ({"vllm_xargs": {"ttl_s": 30}}, {"x-session-ttl": "60"}, "x-session-ttl"),
    ({"vllm_xargs": {"session_end": 0}}, {"x-session-end": "1"}, "x-session-end"),
])
def test_a_header_and_its_vllm_xargs_key_must_agree(payload, headers, field):
    """Found by review: the header silently won over a different `vllm_xargs` value, where conflicting session ids
    are refused."""
    with pytest.raises(InvalidSessionInput, match="conflicting") as exc:
        read({"session_id": "s", **payload}, headers)
    assert exc.value.field == field
    agreeing = read({"session_id": "s", "vllm_xargs": {"agent_role": "Planner", "ttl_s": 60, "session_end": True}},
                    {"x-agent-role": "planner", "x-session-ttl": "60", "x-session-end": "yes"})
    assert (agreeing.role, agreeing.ttl_s, agreeing.end) == ("planner", 60.0, True)
