"""kvsched's body limit in Ray's HTTP proxy (kvsched/adapters/ray/proxy_body.py) on a request that declares a length
and is sent chunked (review70). uvicorn's httptools parser refuses such a request (400), but its h11 parser, which
uvicorn runs where httptools is not installed, reads the body chunked as RFC 9112 6.3 says (Transfer-Encoding beats
Content-Length): the limit trusted the declared length, passed the request on unwrapped, and an unlimited body reached
Ray's proxy queue. Over the stand-in for Ray's proxy app of tests/ray/test_proxy_body_units.py, and over a real
uvicorn (h11) on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from kvsched.adapters.ray.proxy_body import ProxyBodyLimit
from tests.raw_http import answered, chunked, exchange
from tests.ray.test_proxy_body_units import LIMIT, RayLike, refused, run


@pytest.mark.parametrize("declared", [b"0", b"10", b"1000"])
def test_a_chunked_body_is_counted_whatever_length_it_declares(declared: bytes) -> None:
    ray = RayLike()
    sent, _ = run(ProxyBodyLimit(ray, LIMIT), [(b"content-length", declared), (b"transfer-encoding", b"chunked")],
                  [b"x" * 400] * 10)
    refused(sent)
    assert ray.left and ray.read == 800, ray.read
    ray = RayLike()  # at the limit: passed on
    sent, _ = run(ProxyBodyLimit(ray, LIMIT), [(b"transfer-encoding", b"chunked"), (b"content-length", declared)],
                  [b"x" * 500, b"x" * 500])
    assert sent[0]["status"] == 200 and ray.read == LIMIT and not ray.left


def test_a_chunked_body_declaring_a_length_over_the_limit_is_judged_by_what_it_sends() -> None:
    """The declared length means nothing beside Transfer-Encoding (RFC 9112 6.3): a small chunked body passes."""
    ray = RayLike()
    sent, _ = run(ProxyBodyLimit(ray, LIMIT), [(b"content-length", b"5000"), (b"transfer-encoding", b"chunked")],
                  [b"x" * 10])
    assert sent[0]["status"] == 200 and ray.read == 10


@pytest.fixture
def h11_port() -> Iterator[int]:
    """A real uvicorn with its h11 parser, serving the stand-in proxy app behind the limit."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(ProxyBodyLimit(RayLike(), LIMIT), host="127.0.0.1", port=port, http="h11",
                                           lifespan="off", log_level="critical", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def test_h11_reads_a_body_declaring_zero_chunked_and_the_limit_refuses_it(h11_port: int) -> None:
    answer, failure = exchange(h11_port, "/v1/chat/completions",
                               [b"connection: close", b"content-length: 0", b"transfer-encoding: chunked"],
                               chunked(b"x" * 5000, 500), timeout_s=20)
    assert failure is None and answer.startswith(b"HTTP/1.1 413 "), (failure, answer[:300])
    status, _, error = answered(answer)
    assert status == 413 and f"over the limit of {LIMIT} bytes" in error["error"]["message"], answer[:300]
