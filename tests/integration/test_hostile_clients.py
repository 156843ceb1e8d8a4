"""A hostile but plausible client against the shared hardened `vllm serve --scheduler kvsched` (conftest.py; no
start-up of its own): header values no other test sends (NUL, control characters, 1 MB, Latin-1 bytes, the same
header twice), the probes that found bugs (tests/adapters/vllm/test_hostile_requests.py has each as a unit test), and
a pinned session's turn dropped mid-stream or ended while it runs. After each: a normal request is served as before,
and no block is held but by a pin (an idle pool's free blocks and pinned blocks add up to all of it).
Its sessions live under a salt of its own, so the other modules' sessions on the server do not enter its counts."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.integration.secure import KEYS, chat, request, rows, stats

pytestmark = pytest.mark.integration
SALT = f"hostile-{uuid.uuid4().hex[:8]}"
KEY = KEYS[1]
PROMPT = "The quick brown fox jumps over the lazy dog. " * 12  # ~4 blocks: a finished turn pins some
CHAT = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                   "cache_salt": SALT}).encode()
IDLE_WAIT_S = 120.0  # an aborted request's blocks come back when the engine has seen the disconnect (bounded wait)


def send_raw(server: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> tuple[
        int, bytes]:
    """Bytes as given (httpx refuses to send NUL, control characters, the same header twice). -> (status, body)"""
    url = urlparse(server.base)
    with socket.create_connection((url.hostname, url.port), timeout=120) as sock:
        head = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        sock.sendall(b"%s %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n%s" % (
            method.encode(), path.encode(), head, len(body), body))
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def served_as_before(server: Any, reference: dict[str, str]) -> None:
    """A normal turn is answered as the first one was (greedy decoding: the same text), and the engine is idle with
    every block either free or pinned (none leaked by an aborted or ended turn)."""
    r = chat(server, [{"role": "user", "content": "Reference turn of the hostile client module"}], key=KEY,
             max_tokens=4, cache_salt=SALT)
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["message"]["content"]
    assert reference.setdefault("text", text) == text
    deadline = time.monotonic() + IDLE_WAIT_S
    while True:
        st = stats(server)
        if st["free_blocks"] + st["pinned_blocks"] == st["total_blocks"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st["free_blocks"] + st["pinned_blocks"] == st["total_blocks"], st


@pytest.fixture(scope="module")
def reference() -> dict[str, str]:
    return {}


BASE_HEADERS = [(b"Authorization", b"Bearer " + KEY.encode()), (b"Content-Type", b"application/json")]


@pytest.mark.parametrize("headers, status, param", [
    ([(b"X-Session-Id", b"a\x00b")], 400, None),  # uvicorn refuses the request line by line: nothing reaches kvsched
    ([(b"X-Session-Id", b"a\x01b")], 400, None),
    ([(b"X-Session-Id", b"a\tb")], 400, "X-Session-Id"),  # a tab is legal in HTTP, not in an id
    ([(b"X-Session-Id", b"s" * 1_000_000)], 400, "X-Session-Id"),
    ([(b"X-Agent-Role", b"r" * 1_000_000), (b"X-Session-Id", b"s")], 400, "x-agent-role"),
    ([(b"X-KVSched-Compaction", b"c" * 1_000_000)], 400, "X-KVSched-Compaction"),
    ([(b"X-Session-Id", b"caf\xe9")], 400, "x-session-id"),  # Latin-1, not UTF-8
    ([(b"X-Session-Id", b"hostile-dup-a"), (b"X-Session-Id", b"hostile-dup-b")], 400, "x-session-id"),
    ([(b"X-Session-Id", b"s"), (b"X-Agent-Role", b"worker"), (b"X-Agent-Role", b"critic")], 400, "x-agent-role"),
    ([(b"X-Session-Id", b"s"), (b"X-KVSched-Compaction", b"off"), (b"X-KVSched-Compaction", b"summarize")], 400,
     "x-kvsched-compaction"),
    ([(b"X-Session-Id", b"hostile-same"), (b"X-Session-Id", b"hostile-same")], 200, None),
])
def test_hostile_header_values_get_a_clear_answer(secure_server, reference, headers, status, param):
    got, body = send_raw(secure_server, "POST", "/v1/chat/completions", BASE_HEADERS + headers, CHAT)
    assert got == status, body[:300]
    if param is not None:
        assert json.loads(body)["error"]["param"] == param
    served_as_before(secure_server, reference)


@pytest.mark.parametrize("body, param", [
    ({"vllm_xargs": {"session_id": "hostile-x", "kvsched_infer": "maybe"}}, "vllm_xargs.kvsched_infer"),
    ({"vllm_xargs": {"session_id": "hostile-x", "kvsched_infer": [0]}}, "vllm_xargs.kvsched_infer"),
    ({"session_id": {"nested": ["id"]}}, "session_id"),
    ({"vllm_xargs": {"session_id": "hostile-x", "ttl_s": "Infinity"}}, "vllm_xargs.ttl_s"),
    ({"vllm_xargs": {"session_id": "hostile-x", "session_end": 2}}, "vllm_xargs.session_end"),
    ({"prompt_cache_key": 12345}, "prompt_cache_key"),
])
def test_fields_of_the_wrong_type_are_a_400_naming_them(secure_server, reference, body, param):
    r = chat(secure_server, [{"role": "user", "content": "hi"}], key=KEY, cache_salt=SALT, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    served_as_before(secure_server, reference)


def test_a_responses_request_id_of_the_wrong_type_gets_vllms_400_with_a_session_too(secure_server):
    body = {"model": "tiny", "input": "hi", "max_output_tokens": 4, "request_id": 5, "cache_salt": SALT}
    for headers in ({}, {"X-Session-Id": "hostile-resp"}):  # kvsched replaced it (200) when a session was named
        r = request(secure_server, "POST", "/v1/responses", KEY, body, headers)
        assert r.status_code == 400 and "request_id" in r.text, r.text


def test_the_session_routes_refuse_a_path_that_is_not_utf8_and_two_salts(secure_server):
    auth = [(b"Authorization", b"Bearer " + KEY.encode())]
    status, body = send_raw(secure_server, "DELETE", "/kvsched/sessions/%ff", auth)
    assert status == 400 and json.loads(body)["error"]["param"] == "session_id"
    status, body = send_raw(secure_server, "GET", "/kvsched/sessions", auth + [
        (b"X-KVSched-Cache-Salt", b"a"), (b"X-KVSched-Cache-Salt", b"b")])
    assert status == 400 and json.loads(body)["error"]["param"] == "x-kvsched-cache-salt"
    for method in ("POST", "PUT", "PATCH"):
        status, body = send_raw(secure_server, method, "/kvsched/sessions", auth, b"x" * 1000)
        assert status == 405 and b"is not supported" in body


def turn(server: Any, session: str, text: str, **body: Any) -> httpx.Response:
    return chat(server, [{"role": "user", "content": text}], session=session, key=KEY, cache_salt=SALT, **body)


def mine(server: Any, session: str) -> int | None:
    """The blocks pinned for the session, over its branches (a turn whose prompt does not continue the pinned one
    starts a branch); None when it has none."""
    found = [row["pinned_blocks"] for (sid, _), row in rows(server, KEY, SALT).items() if sid == session]
    return sum(found) if found else None


def test_a_turn_dropped_mid_stream_leaves_its_session_pinned_and_its_retry_hits_it(secure_server, reference):
    """The client goes away one chunk into its second turn, then sends that turn again (as a client library's retry
    does): the aborted turn leaks no block, the session keeps a pin, and the retry starts on it."""
    session = f"hostile-drop-{uuid.uuid4().hex[:6]}"
    first = turn(secure_server, session, PROMPT)
    assert first.status_code == 200 and mine(secure_server, session)
    messages = [{"role": "user", "content": PROMPT},
                {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                {"role": "user", "content": "Tell me more."}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 300, "ignore_eos": True, "stream": True,
            "cache_salt": SALT}
    with httpx.Client(timeout=120) as client, client.stream(
            "POST", secure_server.base + "/v1/chat/completions", json=body,
            headers={"Authorization": f"Bearer {KEY}", "X-Session-Id": session}) as r:
        assert r.status_code == 200
        next(r.iter_raw())  # one chunk, then the client goes away
    served_as_before(secure_server, reference)  # the aborted turn's blocks are back
    assert mine(secure_server, session)  # the session still holds a pin
    hits = stats(secure_server)["retained_hits"]
    retry = chat(secure_server, messages, session=session, key=KEY, cache_salt=SALT)
    assert retry.status_code == 200
    assert stats(secure_server)["retained_hits"] == hits + 1  # and the retry started on it
    assert request(secure_server, "DELETE", f"/kvsched/sessions/{session}", KEY,
                   headers={"X-KVSched-Cache-Salt": SALT}).status_code == 200
    served_as_before(secure_server, reference)


def test_a_session_ended_while_its_turn_runs_is_not_pinned_again(secure_server, reference):
    session = f"hostile-end-{uuid.uuid4().hex[:6]}"
    assert turn(secure_server, session, PROMPT).status_code == 200
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT + " longer"}], "max_tokens": 300,
            "ignore_eos": True, "stream": True, "cache_salt": SALT}
    started, result = threading.Event(), {}

    def run() -> None:
        with httpx.Client(timeout=120) as client, client.stream(
                "POST", secure_server.base + "/v1/chat/completions", json=body,
                headers={"Authorization": f"Bearer {KEY}", "X-Session-Id": session}) as r:
            lines = r.iter_lines()
            result["first"] = next(lines)
            started.set()
            result["status"], result["done"] = r.status_code, any("[DONE]" in line for line in lines)

    runner = threading.Thread(target=run)
    runner.start()
    assert started.wait(120)
    d = request(secure_server, "DELETE", f"/kvsched/sessions/{session}", KEY, headers={"X-KVSched-Cache-Salt": SALT})
    runner.join()
    assert d.status_code == 200 and result["status"] == 200 and result["done"]
    served_as_before(secure_server, reference)
    assert mine(secure_server, session) is None  # its finish did not pin it again
    assert turn(secure_server, session, PROMPT).status_code == 200 and mine(secure_server, session) is not None
    request(secure_server, "DELETE", f"/kvsched/sessions/{session}", KEY, headers={"X-KVSched-Cache-Salt": SALT})


@pytest.mark.parametrize("where, literal, status, ttl", [
    ("body", b"300", 200, 300.0), ("body", b"300.0", 200, 300.0), ("body", b"3e2", 200, 300.0),
    ("body", b'"300.5"', 200, 300.5), ("body", b"1000000000000000000000000000000", 200, 3600.0),
    ("body", b"true", 400, None), ("body", b"1e400", 400, None), ("body", b"[300]", 400, None),
    ("header", b"300.5", 200, 300.5), ("header", b"3e2", 200, 300.0), ("header", b"0x12c", 400, None),
])
def test_a_ttl_of_every_json_and_header_number_spelling_is_served_with_it_or_refused(secure_server, reference, where,
                                                                                     literal, status, ttl):
    """The type audit of the mypyc build (the compiled policy takes a TTL as a float, an end flag as a bool): a TTL
    written 300, 300.0, 3e2, "300.5", past int64 or in a header reaches the engine as the float it means (capped at the
    server's KVSCHED_MAX_TTL_S 3600 and at the payback ledger's cap when it has one); true, 1e400 (JSON's infinity),
    a list or a hexadecimal header are a 400 naming the field. Never a crashed engine step: a normal turn is served
    after each, no block leaked."""
    session = f"hostile-ttl-{uuid.uuid4().hex[:6]}"
    text = json.dumps([{"role": "user", "content": PROMPT}]).encode()
    xargs = b', "vllm_xargs": {"session_id": "%s", "ttl_s": %s}' % (session.encode(), literal) if where == "body" \
        else b""
    body = b'{"model": "tiny", "messages": %s, "max_tokens": 2, "cache_salt": "%s"%s}' % (text, SALT.encode(), xargs)
    headers = BASE_HEADERS + ([(b"X-Session-Id", session.encode()), (b"X-Session-TTL", literal)] if where == "header"
                              else [])
    got, answer = send_raw(secure_server, "POST", "/v1/chat/completions", headers, body)
    assert got == status, answer[:300]
    if status == 400:
        assert json.loads(answer)["error"]["param"] == ("vllm_xargs.ttl_s" if where == "body" else "x-session-ttl")
    else:
        row = rows(secure_server, KEY, SALT)[(session, 0)]
        cap = stats(secure_server).get("payback_ttl_cap_seconds") or float("inf")
        assert row["ttl_s"] == min(ttl, cap), (row, cap)
        request(secure_server, "DELETE", f"/kvsched/sessions/{session}", KEY, headers={"X-KVSched-Cache-Salt": SALT})
    served_as_before(secure_server, reference)
