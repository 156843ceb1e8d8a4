"""Issue 22's probes, replayed against a real `vllm serve --scheduler kvsched` (the shared hardened server of
conftest.py): each gets the safe answer."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest

from tests.integration.secure import ADMIN, KEYS, SYSTEM, chat, request, rows, stats

pytestmark = pytest.mark.integration
WORDS = "agent tool result page document query answer search cache block token prefix session memory".split()


def words(i: int, n: int) -> str:
    return f"[{i}] " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(n))


def long_history() -> list[dict[str, str]]:
    """Older context well over the compaction trigger (300 tokens) once the newest two messages are set aside."""
    msgs = [{"role": "system", "content": SYSTEM}]
    for i in range(5):
        msgs += [{"role": "user", "content": words(i, 60)}, {"role": "assistant", "content": f"noted {i}"}]
    return msgs + [{"role": "user", "content": "go on"}]


WATCHED = ("kvsched_compaction_summary_calls_total", "kvsched_sessions_seen_total",
           "kvsched_requests_with_session_total", "kvsched_rejected_requests_total", "kvsched_inferred_sessions_total",
           "kvsched_compaction_refused_choices_total", "vllm:prompt_tokens_total")


def side_effects(server):
    m = server.metrics()
    return {name: m.get(name, 0.0) for name in WATCHED}, stats(server)["pins"]


def test_without_a_valid_key_nothing_of_kvsched_runs(secure_server):
    s = secure_server
    before = side_effects(s)
    hdrs = {"X-Session-Id": "no-key", "X-KVSched-Compaction": "summarize", "X-Agent-Role": "worker",
            "X-Session-TTL": "60", "X-Session-End": "1"}
    for key in (None, "wrong-key"):
        assert chat(s, long_history(), key=key, headers=hdrs).status_code == 401  # would summarize with a key
        assert chat(s, long_history(), session="x" * 200, key=key).status_code == 401  # kvsched's 400 with a key
        for path, body in (("/v1/completions", {"model": "tiny", "prompt": "hi", "prompt_cache_key": "k"}),
                           ("/v1/responses", {"model": "tiny", "input": "hi", "user": "u"}),
                           ("/v1/messages", {"model": "tiny", "max_tokens": 2, "messages": [
                               {"role": "user", "content": [{"type": "text", "text": "hi",
                                                             "cache_control": {"type": "ephemeral", "ttl": "2d"}}]}]})):
            assert request(s, "POST", path, key, body, hdrs).status_code == 401
        assert request(s, "POST", "/v1/chat/completions", key, content=b"[" * 100_000).status_code == 401
        for method, path in (("GET", "/kvsched/sessions"), ("GET", "/kvsched/sessions?summary=1"),
                             ("DELETE", "/kvsched/sessions/no-key"), ("DELETE", "/kvsched/sessions")):
            assert request(s, method, path, key).status_code == 401
    assert side_effects(s) == before
    # The control: the same request with a key does make the summary call, so the check above can fail.
    r = chat(s, long_history(), key=KEYS[0], headers={**hdrs, "X-Session-End": "0"})
    assert r.status_code == 200 and int(r.headers["x-kvsched-compacted"]) > 0
    assert side_effects(s)[0]["kvsched_compaction_summary_calls_total"] == \
        before[0]["kvsched_compaction_summary_calls_total"] + 1


def test_a_stranger_under_the_victims_id_changes_nothing_of_its_session(secure_server):
    s = secure_server
    victim = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": words(1, 80)}]
    control = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": words(2, 80)}]
    first = chat(s, victim, "victim-1", headers={"X-Session-TTL": "3600"})
    chat(s, control, "control-1", headers={"X-Session-TTL": "3600"})
    row = rows(s)[("victim-1", 0)]
    assert row["pinned_blocks"] >= 8 and row["ttl_s"] == 3600.0
    # Same key, no salt: a second client sends other prompts under the victim's id, asks for a short TTL, ends it.
    for extra in ({"X-Session-TTL": "30"}, {"X-Session-TTL": "0"}, {"X-Session-End": "1"}):
        stranger = [{"role": "user", "content": words(9, 40)}]
        assert chat(s, stranger, "victim-1", headers=extra).status_code == 200
    assert {k: v for k, v in rows(s)[("victim-1", 0)].items() if k != "idle_s"} == \
        {k: v for k, v in row.items() if k != "idle_s"}
    assert request(s, "DELETE", "/kvsched/sessions/victim-1", KEYS[1]).status_code == 404  # another tenant
    for i in range(4):  # memory pressure from another tenant's one-shot requests
        assert chat(s, [{"role": "user", "content": words(20 + i, 100)}], key=KEYS[1]).status_code == 200
    for name, history in (("victim-1", victim), ("control-1", control)):
        history = history + [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                             {"role": "user", "content": "next"}]
        hits0 = s.metrics()["kvsched_retained_hit_tokens_total"]
        chat(s, history, name, headers={"X-Session-End": "1"})  # the last turn (its TTL-3600 pin must not linger)
        assert s.metrics()["kvsched_retained_hit_tokens_total"] - hits0 >= row["pinned_tokens"] - 32, name


def raw_delete(server, raw_path: str, key: str = KEYS[0]) -> int:
    """DELETE with the path exactly as written (no client-side normalisation of %2E%2E or %2F)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("DELETE", raw_path, headers={"Authorization": f"Bearer {key}"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_paths_are_decoded_exactly_once(secure_server):
    s = secure_server
    ids = ["x%41", "xA", "a/b", "..", "%2F", "p%"]
    for sid in ids:
        assert chat(s, [{"role": "user", "content": "hello"}], sid).status_code == 200
    assert raw_delete(s, "/kvsched/sessions/x%2541") == 200  # the id x%41, not xA
    listed = {sid for sid, _ in rows(s, KEYS[0])}
    assert "x%41" not in listed and "xA" in listed
    for raw, sid in (("/kvsched/sessions/a%2Fb", "a/b"), ("/kvsched/sessions/%2E%2E", ".."),
                     ("/kvsched/sessions/%252F", "%2F"), ("/kvsched/sessions/p%25", "p%"),
                     ("/kvsched/sessions/xA", "xA")):
        assert raw_delete(s, raw) == 200, raw
        assert sid not in {i for i, _ in rows(s, KEYS[0])}


def test_json_too_deep_is_400_and_a_body_over_64_mib_is_413(secure_server):
    s = secure_server
    r = request(s, "POST", "/v1/chat/completions", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "nested deeper" in r.text
    assert oversized_post(s, 64 * 2**20 + 1) == 413
    assert request(s, "GET", "/health", None).status_code == 200


def oversized_post(server, size: int) -> int:
    """POST a body of `size` bytes (sent while the answer is read: the server may answer before it is all sent)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()

    def push():
        try:
            sock.sendall(head)
            chunk = b" " * 2**20
            for _ in range(size // len(chunk) + 1):
                sock.sendall(chunk)
        except OSError:
            pass  # the server answered and closed: that is the point

    t = threading.Thread(target=push, daemon=True)
    t.start()
    data = b""
    while b"\r\n" not in data:
        part = sock.recv(4096)
        if not part:
            break
        data += part
    sock.close()
    return int(data.split(b" ", 2)[1])


def test_the_session_list_pages(secure_server):
    s = secure_server
    salt = "paging-salt-0123456789"
    for i in range(120):
        r = request(s, "POST", "/v1/completions", KEYS[1], {"model": "tiny", "prompt": "hi", "max_tokens": 1,
                                                             "cache_salt": salt, "prompt_cache_key": f"p{i:03d}"})
        assert r.status_code == 200, r.text
    scope = {"X-KVSched-Cache-Salt": salt}
    first = request(s, "GET", "/kvsched/sessions", KEYS[1], headers=scope).json()
    assert len(first["sessions"]) == 100 and first["total"] == 120 and first["next_cursor"]
    second = request(s, "GET", f"/kvsched/sessions?cursor={first['next_cursor']}", KEYS[1], headers=scope).json()
    ids = [r["session_id"] for r in first["sessions"] + second["sessions"]]
    assert ids == [f"p{i:03d}" for i in range(120)] and second["next_cursor"] is None
    summary = request(s, "GET", "/kvsched/sessions?summary=1", KEYS[1], headers=scope).json()
    assert summary == {"summary": {"sessions": 120, "pinned_sessions": 0, "pinned_blocks": 0,
                                   "pinned_session_blocks": 0, "inferred_sessions": 0}}
    assert request(s, "GET", "/kvsched/sessions?summary=1", KEYS[0], headers=scope).json()["summary"]["sessions"] == 0
    assert request(s, "GET", "/kvsched/sessions?summary=1", ADMIN, headers=scope).json()["summary"]["sessions"] == 120
    for query, param in (("limit=0", "limit"), ("limit=5000", "limit"), ("cursor=zzz", "cursor"), ("page=2", "page")):
        r = request(s, "GET", f"/kvsched/sessions?{query}", KEYS[1], headers=scope)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert request(s, "DELETE", "/kvsched/sessions", KEYS[1], headers=scope).json() == {"ended": 120}


def test_routes_kvsched_does_not_rewrite_refuse_its_marks_and_keyed_sessions(secure_server):
    """vLLM passes the `vllm_xargs` of `/invocations` and `/v1/chat/completions/batch` to the engine unchanged: a
    forged `kvsched_tenant` would reach another key's sessions, a forged compaction mark would end a branch, and a
    keyed caller's session id there would be shared with every other key. Each is a 400 naming the field, before the
    engine sees anything; the same requests without those fields are served."""
    s = secure_server
    before = side_effects(s)
    msgs = [{"role": "user", "content": "hi"}]
    forged = {"model": "tiny", "max_tokens": 2, "messages": msgs, "vllm_xargs": {"kvsched_tenant": "t", "x": 1}}
    r = request(s, "POST", "/invocations", None, forged)  # vLLM checks no key there
    assert r.status_code == 400 and r.json()["error"]["param"] == "vllm_xargs.kvsched_tenant", r.text
    marked = {"model": "tiny", "max_tokens": 2, "messages": [msgs], "vllm_xargs": {"kvsched_compacted": 1}}
    r = request(s, "POST", "/v1/chat/completions/batch", KEYS[0], marked)
    assert r.status_code == 400 and "kvsched's middleware only" in r.text, r.text
    named = {"model": "tiny", "max_tokens": 2, "messages": [msgs], "vllm_xargs": {"session_id": "shared"}}
    r = request(s, "POST", "/v1/chat/completions/batch", KEYS[0], named)
    assert r.status_code == 400 and "per API key" in r.text, r.text
    after = side_effects(s)
    assert after[0]["vllm:prompt_tokens_total"] == before[0]["vllm:prompt_tokens_total"]  # nothing ran
    assert after[0]["kvsched_rejected_requests_total"] == before[0]["kvsched_rejected_requests_total"] + 3
    # the control: without kvsched's fields both routes run (so the 400s above are kvsched's, not vLLM's)
    r = request(s, "POST", "/invocations", None, {"model": "tiny", "max_tokens": 2, "messages": msgs})
    assert r.status_code == 200, r.text
    r = request(s, "POST", "/v1/chat/completions/batch", KEYS[0], {"model": "tiny", "max_tokens": 2,
                                                                    "messages": [msgs, msgs]})
    assert r.status_code == 200, r.text
