"""The ingress's body reader (`kvsched/adapters/ray/ingress_body.py`) without a cluster: what it reads, drains and
answers for a body over the limit, too slow or compressed (tests/ray/test_ingress_bodies.py: the same through Ray)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from kvsched.adapters.ray.ingress_body import RequestBody
from kvsched.adapters.ray.requests import BadRequest
from tests.asgi_parts import body_parts


def fake(parts: list[bytes], headers: dict[str, str], hang: bool = False, http_version: str = "1.1") -> Any:
    """A request whose body comes in `parts` (then, if `hang`, never ends); `left`: the parts not read."""
    messages, receive = body_parts(parts, hang)
    scope = {"headers": [(k.encode(), v.encode()) for k, v in headers.items()], "http_version": http_version}
    return SimpleNamespace(scope=scope, receive=receive, headers=headers, left=messages)


def refusal(request: Any, max_bytes: int = 100, timeout_s: float = 5.0) -> tuple[BadRequest, dict[str, str] | None]:
    async def run() -> tuple[BadRequest, dict[str, str] | None]:
        body = RequestBody(request)
        with pytest.raises(BadRequest) as refused:
            await body.read(max_bytes, timeout_s)
        return refused.value, await body.before_refusal(refused.value)

    return asyncio.run(run())


def test_a_body_over_the_limit_is_drained_only_on_a_connection_that_closes() -> None:
    for headers, version, drained in (({"connection": "close"}, "1.1", True), ({}, "1.0", True),
                                      ({"connection": "keep-alive"}, "1.0", False), ({}, "1.1", False)):
        request = fake([b"x" * 60] * 5, headers, http_version=version)
        exc, extra = refusal(request)
        assert exc.status == 413 and extra is None
        assert (request.left == []) == drained, (headers, version, len(request.left))
    request = fake([b"x" * 60] * 5, {"connection": "close", "content-length": "300"})
    exc, _ = refusal(request)  # refused by its declared length, unread: drained all the same
    assert exc.status == 413 and "300 bytes" in exc.message and request.left == []


def test_a_body_that_does_not_arrive_is_a_408_that_closes_and_is_not_drained() -> None:
    request = fake([b"{"], {"connection": "close"}, hang=True)
    exc, extra = refusal(request, timeout_s=0.1)
    assert exc.status == 408 and "within 0.1 s" in exc.message and "1 bytes" in exc.message
    assert extra == {"connection": "close"}


def test_a_compressed_body_is_a_415_and_identity_is_no_encoding() -> None:
    for encoding in ("gzip", "deflate", "identity, br", "x-gzip"):
        exc, _ = refusal(fake([b"{}"], {"content-encoding": encoding}))
        assert exc.status == 415 and exc.param == "content-encoding", encoding

    async def identity() -> bytes:
        return await RequestBody(fake([b"{}"], {"content-encoding": "Identity"})).read(100)

    assert asyncio.run(identity()) == b"{}"
