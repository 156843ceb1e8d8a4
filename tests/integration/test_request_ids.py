"""`vllm serve --enable-request-id-headers` (the shared hardened server, conftest.py; no start-up of its own): every
answer carries `x-request-id`, the client's X-Request-Id or a new uuid4 hex, kvsched's own answers (session pages, its
400/401/413 refusals) as well as vLLM's. Before, kvsched's answered before vLLM's middleware and carried none."""

from __future__ import annotations

import re
import socket

import pytest

from tests.integration.secure import ADMIN, KEYS, chat, request

pytestmark = pytest.mark.integration
NEW_ID = re.compile(r"[0-9a-f]{32}")


def declared_too_large(server, request_id: str | None) -> tuple[int, list[bytes]]:
    """A chat request declaring a body over 64 MiB (kvsched refuses it, 413, before reading any): -> (status, the
    values of its x-request-id headers)."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {64 * 2**20 + 1}\r\n"
            + (f"X-Request-Id: {request_id}\r\n" if request_id else "") + "\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(1 << 16)):
            data += chunk
    lines = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    values = [v.strip() for k, _, v in (line.partition(b":") for line in lines[1:]) if k.lower() == b"x-request-id"]
    return int(lines[0].split()[1]), values


def answers(server, headers: dict[str, str]) -> list:
    """vLLM's answers (a served turn, its 401) and one of each kind kvsched makes itself, each checked to be it."""
    turn = chat(server, [{"role": "user", "content": "hello"}], "request-ids", headers=headers)
    assert turn.status_code == 200, turn.text
    vllm_401 = chat(server, [{"role": "user", "content": "hello"}], key="wrong", headers=headers)
    assert vllm_401.status_code == 401
    page = request(server, "GET", "/kvsched/sessions?limit=1", ADMIN, headers=headers)
    assert page.status_code == 200 and "sessions" in page.json()
    admin_401 = request(server, "GET", "/kvsched/sessions", "wrong", headers=headers)
    assert admin_401.status_code == 401
    too_deep = request(server, "POST", "/v1/chat/completions", content=b"[" * 100_000,
                       headers={"Content-Type": "application/json", **headers})
    assert too_deep.status_code == 400 and "nested deeper" in too_deep.text
    bad_id = chat(server, [{"role": "user", "content": "hello"}], "s" * 200, headers=headers)
    assert bad_id.status_code == 400 and "200 characters" in bad_id.text
    return [turn, vllm_401, page, admin_401, too_deep, bad_id]


def test_every_answer_echoes_the_clients_request_id(secure_server):
    for r in answers(secure_server, {"X-Request-Id": "op-trace-42"}):
        assert r.headers.get_list("x-request-id") == ["op-trace-42"], (r.request.url, r.status_code, r.headers)
    assert declared_too_large(secure_server, "op-trace-43") == (413, [b"op-trace-43"])


def test_every_answer_gets_a_new_request_id_when_the_client_sent_none(secure_server):
    ids = [r.headers.get_list("x-request-id") for r in answers(secure_server, {})]
    assert all(len(i) == 1 and NEW_ID.fullmatch(i[0]) for i in ids), ids
    assert len({i[0] for i in ids}) == len(ids)
    status, values = declared_too_large(secure_server, None)
    assert status == 413 and len(values) == 1 and NEW_ID.fullmatch(values[0].decode()), values
