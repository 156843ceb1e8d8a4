"""kvsched's own answers (the session routes, its 400/401/413s) under vLLM's `--enable-request-id-headers`. vLLM's
XRequestIdMiddleware gives every answer an `x-request-id`: the client's own X-Request-Id, else a new uuid4 hex. vLLM
adds kvsched's middleware outside it (`init_entrypoints_middleware`: `--middleware` classes are added last), so what
kvsched answered itself carried none, and an operator matching answers to logs by it lost exactly kvsched's refusals."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("vllm")
from tests.adapters.vllm.test_middleware_cors import UI, served  # noqa: E402

KEY = {"Authorization": "Bearer k"}
NEW_ID = re.compile(r"[0-9a-f]{32}")  # uuid.uuid4().hex, as vLLM makes it


def kvscheds_answers(client, headers: dict[str, str]) -> list:
    """One of each answer kvsched makes itself, checked to be kvsched's (status and text)."""
    page = client.get("/kvsched/sessions", headers={**KEY, **headers})
    assert page.status_code == 200, page.text
    refused = client.get("/kvsched/sessions?limit=0", headers={**KEY, **headers})
    assert refused.status_code == 400 and "limit" in refused.text
    stranger = client.get("/kvsched/sessions", headers={"Authorization": "Bearer wrong", **headers})
    assert stranger.status_code == 401
    bad = client.post("/v1/chat/completions", headers={**KEY, "X-Session-Id": "s" * 200, **headers},
                      json={"model": "m", "messages": []})
    assert bad.status_code == 400 and "200 characters" in bad.text
    huge = client.post("/v1/chat/completions", headers={**KEY, "Content-Type": "application/json", **headers},
                       content=b"[" * 1_000_001)
    assert huge.status_code == 413 and "1,000,000" in huge.text
    forged = client.post("/v1/embeddings", headers={**KEY, **headers},
                         json={"input": "x", "vllm_xargs": {"kvsched_tenant": "t"}})
    assert forged.status_code == 400 and "kvsched_tenant" in forged.text
    return [page, refused, stranger, bad, huge, forged]


def vllms_answers(client, headers: dict[str, str]) -> list:
    """Answers vLLM makes (its route; its own 401 to an unkeyed generation request), passed through kvsched."""
    models = client.get("/v1/models", headers={**KEY, **headers})
    unkeyed = client.post("/v1/chat/completions", headers={"Authorization": "Bearer wrong", **headers},
                          json={"model": "m", "messages": []})
    assert models.status_code == 200 and unkeyed.status_code == 401
    return [models, unkeyed]


def test_kvscheds_own_answers_echo_the_clients_request_id_as_vllms_do() -> None:
    client = served([], request_ids=True)
    for response in vllms_answers(client, {"X-Request-Id": "trace-7"}) + kvscheds_answers(client,
                                                                                          {"X-Request-Id": "trace-7"}):
        assert response.headers.get_list("x-request-id") == ["trace-7"], (response.request.url, response.headers)


def test_kvscheds_own_answers_get_a_new_request_id_of_vllms_kind_when_the_client_sent_none() -> None:
    client = served([], request_ids=True)
    responses = vllms_answers(client, {}) + kvscheds_answers(client, {})
    ids = [r.headers.get_list("x-request-id") for r in responses]
    assert all(len(i) == 1 and NEW_ID.fullmatch(i[0]) for i in ids), ids
    assert len({i[0] for i in ids}) == len(ids)  # a new one each answer


def test_a_repeated_request_id_is_read_as_vllm_reads_it() -> None:
    """Two X-Request-Id headers: vLLM's middleware echoes the first (Starlette's `Headers.get`); so does kvsched."""
    client = served([], request_ids=True)
    sent = [("Authorization", "Bearer k"), ("X-Request-Id", "first"), ("X-Request-Id", "second")]
    assert client.get("/v1/models", headers=sent).headers.get_list("x-request-id") == ["first"]  # vLLM's
    assert client.get("/kvsched/sessions", headers=sent).headers.get_list("x-request-id") == ["first"]


def test_request_id_and_cors_headers_come_in_vllms_order() -> None:
    """vLLM's XRequestIdMiddleware wraps its CORSMiddleware: the CORS headers, then x-request-id, as vLLM's own."""
    client = served([UI], request_ids=True)
    headers = {"Origin": UI, "X-Request-Id": "r"}
    names = [[k for k, _ in r.headers.multi_items() if k.startswith(("access-control", "x-request-id"))]
             for r in vllms_answers(client, headers)[:1] + kvscheds_answers(client, headers)]
    assert all(n == names[0] for n in names) and names[0][-1] == "x-request-id", names


def test_no_request_id_without_the_flag() -> None:
    client = served([], request_ids=False)
    for response in vllms_answers(client, {"X-Request-Id": "r"}) + kvscheds_answers(client, {"X-Request-Id": "r"}):
        assert "x-request-id" not in response.headers
