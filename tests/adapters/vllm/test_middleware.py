"""The API-server side, as pure functions: session field validation and the metrics splice."""

import pytest

from kvsched.adapters.vllm.metrics import render_metrics
from kvsched.adapters.vllm.middleware import append_metrics, apply_session_fields
from kvsched.core.sessions import InvalidSessionInput


def test_headers_are_copied_into_vllm_xargs():
    payload = {"messages": []}
    headers = {"x-session-id": "wf/1", "x-agent-role": "Orchestrator", "x-session-ttl": "2.5", "x-session-end": "1"}
    assert apply_session_fields(payload, headers) is True
    assert payload["vllm_xargs"] == {"session_id": "wf/1", "agent_role": "orchestrator", "ttl_s": 2.5,
                                     "session_end": 1}


def test_body_field_and_xargs_agree_or_fail():
    payload = {"session_id": "a", "vllm_xargs": {"session_id": "a", "other": 1}}
    assert apply_session_fields(payload, {}) is False  # nothing to add
    with pytest.raises(InvalidSessionInput, match="conflicting"):
        apply_session_fields({"session_id": "a"}, {"x-session-id": "b"})


def test_requests_without_a_session_are_untouched():
    payload = {"messages": [], "vllm_xargs": {"foo": 1}}
    assert apply_session_fields(payload, {}) is False and payload == {"messages": [], "vllm_xargs": {"foo": 1}}


@pytest.mark.parametrize("payload, headers", [
    ({}, {"x-session-id": ""}),
    ({"vllm_xargs": {"session_id": 5}}, {}),
    ({}, {"x-session-id": "ok", "x-session-ttl": "-3"}),
    ({"vllm_xargs": {"ttl_s": 3}}, {}),  # a TTL without a session
])
def test_malformed_input_raises(payload, headers):
    with pytest.raises(InvalidSessionInput):
        apply_session_fields(payload, headers)


def test_metrics_are_spliced_before_openmetrics_eof():
    extra = render_metrics({"pinned_blocks": 3, "released_ttl": 2}, openmetrics=True)
    body = append_metrics(b"vllm:x 1\n# EOF\n", extra)
    assert body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
    assert b"kvsched_pinned_blocks 3.0" in body and b'kvsched_pin_releases_total{reason="ttl"} 2.0' in body
    plain = append_metrics(b"vllm:x 1", render_metrics({"sessions_seen": 4}))
    assert b"vllm:x 1\n" in plain and b"kvsched_sessions_seen_total 4.0" in plain
