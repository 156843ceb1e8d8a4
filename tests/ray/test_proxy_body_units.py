"""kvsched's body limit in Ray's HTTP proxy (kvsched/adapters/ray/proxy_body.py) without a cluster: over a stand-in
for Ray's proxy app that reads the body as Ray's does (until the end or a disconnect) and answers, and over Ray's own
middleware stack built from the callback kvsched names. tests/ray/test_proxy_bodies.py: the same on a real cluster."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from kvsched.adapters.ray.proxy_body import ENV_PROXY_MAX_BODY, ProxyBodyLimit, proxy_max_body_bytes
from kvsched.adapters.ray.requests import MAX_BODY_BYTES
from tests.asgi_parts import body_parts

LIMIT = 1000


class RayLike:
    """Reads the body (as Ray's `proxy_asgi_receive`: until its end or a disconnect), then answers 200 with the bytes
    it read, or, told the client left, nothing (Ray's 499). `answer_first`: answers 400 before reading (the ingress
    refusing a header)."""

    def __init__(self, answer_first: bool = False) -> None:
        self.read = 0
        self.left = False
        self.answer_first = answer_first

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.answer_first:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"no"})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.left = True
                return
            self.read += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if not self.answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"%d" % self.read})


def run(app: Any, headers: list[tuple[bytes, bytes]], parts: list[bytes], http_version: str = "1.1",
        hang: bool = False) -> tuple[list[dict[str, Any]], int]:
    """(the messages sent, the body parts left unread)."""
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
             "http_version": http_version}
    messages, receive = body_parts(parts, hang)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent, len(messages)


def refused(sent: list[dict[str, Any]]) -> tuple[dict[bytes, bytes], str]:
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    assert sent[0]["status"] == 413, sent
    error = json.loads(sent[1]["body"])["error"]
    assert error["code"] == 413 and f"over the limit of {LIMIT} bytes" in error["message"], error
    return dict(sent[0]["headers"]), error["message"]


def test_a_declared_length_over_the_limit_is_refused_unread_and_never_reaches_the_proxy() -> None:
    ray = RayLike()
    sent, left = run(ProxyBodyLimit(ray, LIMIT), [(b"content-length", b"1001")], [b"x" * 1001])
    headers, message = refused(sent)
    assert "of 1001 bytes" in message and left == 1 and ray.read == 0 and b"connection" not in headers
    ray = RayLike()  # at the limit: passed on as it came
    sent, _ = run(ProxyBodyLimit(ray, LIMIT), [(b"content-length", b"1000")], [b"x" * 1000])
    assert sent[0]["status"] == 200 and ray.read == 1000


def test_a_declared_length_over_the_limit_on_a_closing_connection_is_drained_first() -> None:
    for headers, version in (([(b"connection", b"close")], "1.1"), ([], "1.0")):
        sent, left = run(ProxyBodyLimit(RayLike(), LIMIT), [(b"content-length", b"4000"), *headers],
                         [b"x" * 1000] * 4, http_version=version)
        refused(sent)
        assert left == 0, (headers, version)


def test_a_client_waiting_for_100_continue_is_answered_at_once_and_the_connection_closed() -> None:
    sent, left = run(ProxyBodyLimit(RayLike(), LIMIT), [(b"content-length", b"4000"), (b"expect", b"100-continue"),
                                                       (b"connection", b"close")], [b"x" * 1000] * 4)
    headers, _ = refused(sent)
    assert headers[b"connection"] == b"close" and left == 4  # never asked for its body


@pytest.mark.parametrize("closing", [False, True])
def test_a_body_without_a_length_is_counted_and_refused_as_it_passes_the_limit(closing: bool) -> None:
    """The proxy is told the client left (it stops reading; Ray cancels the ingress's request), its answer to that is
    dropped, and the 413 is sent: after the rest is drained on a closing connection, else at once (uvicorn drops the
    rest after the answer)."""
    ray = RayLike()
    sent, left = run(ProxyBodyLimit(ray, LIMIT), [(b"transfer-encoding", b"chunked")] + (
        [(b"connection", b"close")] if closing else []), [b"x" * 400] * 10)
    refused(sent)
    assert ray.left and ray.read == 800 and left == (0 if closing else 7), (ray.read, left)
    ray = RayLike()  # within the limit: read and answered by the proxy
    sent, _ = run(ProxyBodyLimit(ray, LIMIT), [(b"transfer-encoding", b"chunked")], [b"x" * 400, b"x" * 600])
    assert sent[0]["status"] == 200 and ray.read == 1000 and not ray.left


def test_a_body_that_ends_at_the_chunk_that_passes_the_limit_is_not_drained() -> None:
    ray = RayLike()
    sent, left = run(ProxyBodyLimit(ray, LIMIT), [(b"transfer-encoding", b"chunked"), (b"connection", b"close")],
                     [b"x" * 900, b"x" * 200], hang=True)  # hang: a drain would wait for a next part forever
    refused(sent)
    assert left == 0 and ray.left


def test_an_answer_begun_before_the_limit_passes_as_it_is() -> None:
    ray = RayLike(answer_first=True)
    sent, _ = run(ProxyBodyLimit(ray, LIMIT), [(b"transfer-encoding", b"chunked")], [b"x" * 400] * 10)
    assert [m.get("status") for m in sent] == [400, None] and sent[1]["body"] == b"no" and ray.read == 4000


def test_other_scopes_pass_untouched() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    for kind in ("websocket", "lifespan", "http"):  # http: a request without a length or an encoding has no body
        asyncio.run(ProxyBodyLimit(app, LIMIT)({"type": kind, "headers": [(b"host", b"x")]}, None, None))
    assert seen == ["websocket", "lifespan", "http"]


def test_the_limit_comes_from_the_proxys_environment_and_a_bad_one_is_named() -> None:
    assert proxy_max_body_bytes({}) == proxy_max_body_bytes({ENV_PROXY_MAX_BODY: " "}) == MAX_BODY_BYTES
    assert proxy_max_body_bytes({ENV_PROXY_MAX_BODY: "2048"}) == 2048
    for bad in ("0", "-1", "1e6", "64MiB", "²"):
        with pytest.raises(ValueError, match=f"{ENV_PROXY_MAX_BODY}="):
            proxy_max_body_bytes({ENV_PROXY_MAX_BODY: bad})


def test_rays_proxy_stack_from_kvscheds_callback_refuses_with_the_limit_it_was_given(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As Ray's proxy builds its app from the callback `controller_options` names, in an environment holding the
    limit it sets (the config's `max_body_bytes`)."""
    from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    from kvsched.adapters.ray.proxy import RAY_PROXY_CALLBACK_ENV, controller_options

    monkeypatch.delenv(RAY_PROXY_CALLBACK_ENV, raising=False)
    env = controller_options(LIMIT)["runtime_env"]["env_vars"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ray = RayLike()
    app = _apply_middlewares(ray, validate_http_proxy_callback_return(
        call_function_from_import_path(env[RAY_PROXY_CALLBACK_ENV])))
    sent, _ = run(app, [(b"content-length", b"1001")], [b"x" * 1001])
    assert sent[0]["status"] == 413 and ray.read == 0
    sent, _ = run(app, [(b"content-length", b"10")], [b"x" * 10])
    assert sent[0]["status"] == 200 and ray.read == 10
