"""Bodies over the limit refused in Ray Serve's HTTP proxy itself (kvsched/adapters/ray/proxy_body.py), before the
proxy queues them for kvsched's ingress: real Ray on loopback, the package's cluster (whose Serve starts with
`proxy.controller_options()`, as `kvsched ray-serve` starts it: the proxy's limit is the default 64 MiB), an ingress
whose own limit is twice that over a stand-in engine replica, so that a 413 naming 64 MiB is the proxy's. Each client
reads the 413 and its message, and the proxy and the ingress serve the next request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from kvsched.adapters.ray.requests import MAX_BODY_BYTES
from tests.raw_http import answered, chunked, exchange
from tests.ray.standin_bodies import GOOD, PATH, bodies_app, serves

pytestmark = pytest.mark.integration
PROXY_LIMIT = MAX_BODY_BYTES  # the package's cluster's proxy: controller_options()'s default
INGRESS_LIMIT = 2 * MAX_BODY_BYTES
BIG = json.dumps({"model": "w", "messages": [{"role": "user", "content": "a" * (PROXY_LIMIT + (1 << 20))}]}).encode()


@pytest.fixture(scope="module")
def port(serve_cluster: dict[str, Any]) -> Iterator[int]:
    """The ingress as `build_app` deploys it, with a 128 MiB body limit, over one stand-in engine replica."""
    with bodies_app(serve_cluster, "proxybodies", INGRESS_LIMIT, 20) as port:
        yield port


def proxys_413(answer: bytes) -> dict[str, str]:
    status, headers, error = answered(answer)
    assert status == 413 and f"over the limit of {PROXY_LIMIT} bytes" in error["error"]["message"], answer[:300]
    return headers


def test_a_declared_length_over_the_limit_is_refused_before_the_proxy_asks_for_the_body(port: int) -> None:
    """Before: Ray's proxy began reading the body (uvicorn answered `100 Continue` to a client waiting for it) and
    routed the request to the ingress, whose limit decided. Now the proxy answers 413 from the headers alone, and a
    client waiting for `100 Continue` is never asked for its body."""
    head = [b"expect: 100-continue", b"content-length: %d" % len(BIG)]
    answer, failure = exchange(port, PATH, head, [], timeout_s=20)
    assert failure is None and not answer.startswith(b"HTTP/1.1 100"), (failure, answer[:300])
    assert proxys_413(answer).get("connection") == "close"
    serves(port)


def test_bodies_over_the_limit_on_a_closing_connection_get_the_proxys_413_not_a_reset(port: int) -> None:
    """Declared or sent without a length (chunked: counted as it arrives), over HTTP/1.1 with `Connection: close` or
    HTTP/1.0: the rest of the body is drained (within bounds) and the client reads the whole 413."""
    for version, head, parts in (
            (b"1.1", [b"connection: close", b"content-length: %d" % len(BIG)], [BIG]),
            (b"1.1", [b"connection: close", b"transfer-encoding: chunked"], chunked(BIG, 1 << 20)),
            (b"1.0", [b"content-length: %d" % len(BIG)], [BIG])):
        answer, failure = exchange(port, PATH, head, parts, version=version, timeout_s=60)
        assert failure is None, (version, head, failure, answer[:300])
        proxys_413(answer)
        serves(port)


def test_clients_read_the_proxys_413(port: int) -> None:
    """The openai client and httpx (a body in one piece, or streamed: chunked) on kept-alive connections, and the next
    request on the same httpx connection is served."""
    import httpx
    import openai

    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(openai.APIStatusError) as refused:
        openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=60).chat.completions.create(
            model="w", messages=[{"role": "user", "content": "a" * (PROXY_LIMIT + (1 << 20))}])
    assert refused.value.status_code == 413 and f"limit of {PROXY_LIMIT} bytes" in str(refused.value)
    with httpx.Client(timeout=60) as client:
        for content in (BIG, iter([BIG[i:i + (1 << 20)] for i in range(0, len(BIG), 1 << 20)])):
            r = client.post(f"{url}/chat/completions", content=content, headers={"content-type": "application/json"})
            assert r.status_code == 413 and f"limit of {PROXY_LIMIT} bytes" in r.json()["error"]["message"], r.text
            r = client.post(f"{url}/chat/completions", content=GOOD, headers={"content-type": "application/json"})
            assert r.status_code == 200, r.text
