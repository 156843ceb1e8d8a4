"""A real `vllm serve --scheduler kvsched` (and a stock one) on the tiny model, driven with the openai client."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from tests import background  # noqa: E402
from tests.integration.servers import SERVE_KEY  # noqa: E402

pytestmark = pytest.mark.integration
KEY = SERVE_KEY
SYSTEM = "You are a careful research agent. Use the tools. " * 8


@pytest.fixture(scope="module")
def kvsched_server(serve_launched):
    """kvsched's server (servers.serve_spec; spawned while test_plan_vllm's engine started); stock vLLM's is the
    package's (conftest.stock_server, served as "replay")."""
    yield background.restore(serve_launched).start()  # waits: launched already (in the background until now)
    serve_launched.stop()


def client(server, key=KEY):
    return openai.OpenAI(base_url=server.url, api_key=key or "none", max_retries=0, timeout=60)


def chat(server, messages, session=None, headers=None, xargs=None, key=KEY, max_tokens=4):
    extra_headers = dict(headers or {})
    if session is not None:
        extra_headers["X-Session-Id"] = session
    return client(server, key).chat.completions.create(
        model=server.spec.served_model_name, messages=messages, max_tokens=max_tokens, extra_headers=extra_headers,
        extra_body={"vllm_xargs": xargs} if xargs else None)


def admin(server, method="GET", path="/kvsched/sessions", key=KEY):
    req = urllib.request.Request(server.base + path, method=method,
                                 headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def sessions(server):
    status, body = admin(server)
    assert status == 200, body
    return {row["session_id"]: row for row in body["sessions"]}, body["stats"]


def test_session_header_is_retained_and_listed(kvsched_server):
    reply = chat(kvsched_server, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "plan"}],
                 session="wf1/orchestrator", headers={"X-Agent-Role": "orchestrator", "X-Session-TTL": "120"})
    assert reply.choices[0].message.content is not None
    rows, stats = sessions(kvsched_server)
    row = rows["wf1/orchestrator"]
    assert row["role"] == "orchestrator" and row["ttl_s"] == 120.0 and row["pinned_blocks"] >= 1
    assert stats["pinned_blocks"] >= row["pinned_blocks"]


def test_vllm_xargs_session_reaches_the_scheduler(kvsched_server):
    chat(kvsched_server, [{"role": "user", "content": "tool result " * 40}],
         xargs={"session_id": "wf1/worker-2", "agent_role": "worker"})
    rows, _ = sessions(kvsched_server)
    assert rows["wf1/worker-2"]["role"] == "worker" and rows["wf1/worker-2"]["turns"] == 1


@pytest.mark.parametrize("session, xargs, message", [
    ("x" * 129, None, "limit is 128"),
    (None, {"session_id": "bad\u0007id"}, "control character"),
    (None, {"session_id": ""}, "must not be empty"),
    ("a", {"session_id": "b"}, "conflicting session ids"),
])
def test_malformed_session_input_is_a_400_with_a_message(kvsched_server, session, xargs, message):
    with pytest.raises(openai.BadRequestError) as info:
        chat(kvsched_server, [{"role": "user", "content": "hi"}], session=session, xargs=xargs)
    assert message in str(info.value)


def test_bad_ttl_and_role_headers_are_400(kvsched_server):
    for headers in ({"X-Session-TTL": "soon"}, {"X-Agent-Role": "a b"}, {"X-Session-End": "perhaps"}):
        with pytest.raises(openai.BadRequestError):
            chat(kvsched_server, [{"role": "user", "content": "hi"}], session="s-bad", headers=headers)
    # the engine is still healthy afterwards
    assert chat(kvsched_server, [{"role": "user", "content": "hi"}], session="s-ok").choices


def test_retained_prefix_survives_a_flood_and_is_hit(kvsched_server):
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "read page 1 " * 40}]
    first = chat(kvsched_server, history, session="retained")
    before = kvsched_server.metrics()
    for i in range(4):  # each fills over a quarter of the 48-block pool
        chat(kvsched_server, [{"role": "user", "content": f"search result {i} " * 150}])
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "tool output " * 20}]
    chat(kvsched_server, history, session="retained")
    after = kvsched_server.metrics()
    saved = after["kvsched_retained_hit_tokens_total"] - before["kvsched_retained_hit_tokens_total"]
    assert saved >= first.usage.prompt_tokens - 32  # every full block of the first turn's prompt


def test_session_end_header_and_delete(kvsched_server):
    chat(kvsched_server, [{"role": "user", "content": "done soon"}], session="ending")
    chat(kvsched_server, [{"role": "user", "content": "done soon"}], session="ending", headers={"X-Session-End": "1"})
    rows, _ = sessions(kvsched_server)
    assert "ending" not in rows
    chat(kvsched_server, [{"role": "user", "content": "delete me"}], session="deleted")
    assert admin(kvsched_server, "DELETE", "/kvsched/sessions/deleted") == (200, {"session_id": "deleted",
                                                                                 "ended": True})
    status, body = admin(kvsched_server, "DELETE", "/kvsched/sessions/deleted")
    assert status == 404 and "no session" in body["error"]["message"]
    status, body = admin(kvsched_server, "DELETE", "/kvsched/sessions/%20x")
    assert status == 400


def test_admin_routes_honour_the_api_key(kvsched_server):
    assert admin(kvsched_server, key=None)[0] == 401
    assert admin(kvsched_server, key="wrong")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        chat(kvsched_server, [{"role": "user", "content": "hi"}], session="s", key="wrong")


def test_a_client_cannot_switch_on_compaction_the_operator_left_off(kvsched_server):
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello " * 50}]
    for choice in ("summarize", "sliding_window", "cap"):
        with pytest.raises(openai.PermissionDeniedError) as info:
            chat(kvsched_server, history, session="policy", headers={"X-KVSched-Compaction": choice})
        assert "KVSCHED_COMPACTION_CLIENT_STRATEGIES allows off" in str(info.value)
    assert chat(kvsched_server, history, session="policy", headers={"X-KVSched-Compaction": "off"}).choices
    assert kvsched_server.metrics()["kvsched_compaction_summary_calls_total"] == 0


def test_kvsched_metrics_on_vllms_metrics(kvsched_server):
    m = kvsched_server.metrics()
    for name in ("kvsched_sessions_seen_total", "kvsched_requests_with_session_total", "kvsched_pinned_blocks",
                 "kvsched_active_sessions", "kvsched_retained_hit_tokens_total", "kvsched_pin_releases_total",
                 "vllm:prefix_cache_hits_total"):
        assert name in m, name
    assert m["kvsched_sessions_seen_total"] >= 3 and m["kvsched_rejected_requests_total"] >= 4


def test_every_block_comes_back_when_all_sessions_end(kvsched_server):
    rows, _ = sessions(kvsched_server)
    for sid in rows:
        admin(kvsched_server, "DELETE", "/kvsched/sessions/" + urllib.request.quote(sid, safe=""))
    _, stats = sessions(kvsched_server)
    assert stats["pinned_blocks"] == 0 and stats["free_blocks"] == stats["total_blocks"]


def test_stock_vllm_without_the_flag_is_untouched(stock_server):
    # stock vLLM ignores what kvsched would reject, has no kvsched routes and no kvsched metrics
    assert chat(stock_server, [{"role": "user", "content": "hi"}], session="x" * 200, key=None).choices
    assert admin(stock_server, key=None)[0] == 404
    assert not any(name.startswith("kvsched_") for name in stock_server.metrics())


def test_a_malformed_kvsched_setting_stops_the_server_at_start_naming_it(failed_starts):
    """Run with the package's other start-ups that must fail (conftest.failed_starts; commands in servers.py)."""
    proc = failed_starts["serve:malformed"]
    assert proc.returncode == 2
    assert "kvsched: KVSCHED_INFER_SESSIONS='maybe'" in proc.stderr
    assert "kvsched: KVSCHED_COMPACTION_CLIENT_STRATEGIES='shrink'" in proc.stderr
    assert "kvsched: KVSCHED_CPU_ISA='sse9'" in proc.stderr  # the engine side's settings, the same way
    assert "kvsched: KVSCHED_STORE_KV_TTL_S must be > 0" in proc.stderr
    assert "KVSCHED_BODY_TIMEOUT_S='0': a number of seconds above 0" in proc.stderr  # the API server's


def test_unknown_scheduler_fails_at_start_with_the_choices(failed_starts):
    proc = failed_starts["serve:unknown"]
    assert proc.returncode != 0
    assert "unknown scheduler 'nonsense'; choose one of: kvsched, default" in proc.stderr


def test_the_fp8_tier_is_on_by_default_and_sized_by_the_rule_it_logs(kvsched_server, tiny_model_dir):
    """`--scheduler kvsched` alone runs the tier: min(2x the KV pool's bytes, 1/4 of available host memory), and the
    start-up log says how it was sized."""
    import re

    from kvsched.core.tier_config import AUTO_POOL_MULTIPLE

    m = kvsched_server.metrics()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    element = 4 if cfg["torch_dtype"] == "float32" else 2
    pool = 48 * 32 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * 2 * head_dim * element
    assert m["kvsched_tier_enabled"] == 1
    assert 0 < m["kvsched_tier_capacity_bytes"] <= AUTO_POOL_MULTIPLE * pool
    slot = cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (32 * 2 * head_dim + 4)  # FP8 + a scale per head
    assert m["kvsched_tier_capacity_bytes"] > AUTO_POOL_MULTIPLE * pool - slot  # a 2x pool: the host share is larger
    log = kvsched_server.log_path.read_text(errors="replace")
    assert re.search(r"kvsched FP8 tier: [\d.]+ GiB of host memory \(auto: min\(2 x the KV pool's bytes", log)
