"""kvsched's body limit in Ray's HTTP proxy (kvsched/adapters/ray/proxy_body.py) on a request that declares a length
and is sent chunked (review70). uvicorn's httptools parser refuses such a request (400), but its h11 parser, which
uvicorn runs where httptools is not installed, reads the body chunked as RFC 9112 6.3 says (Transfer-Encoding beats
Content-Length): the limit trusted the declared length, passed the request on unwrapped, and an unlimited body reached
Ray's proxy queue. Over the stand-in for Ray's proxy app of tests/ray/test_proxy_body_units.py, and over a real
uvicorn (either parser) on loopback."""

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


@pytest.fixture(params=["h11", "httptools"])
def uvicorn_port(request: pytest.FixtureRequest) -> Iterator[int]:
    """A real uvicorn with each of its parsers, serving the stand-in proxy app behind the limit."""
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(ProxyBodyLimit(RayLike(), LIMIT), host="127.0.0.1", port=port, http=request.param,
                            lifespan="off", log_level="critical", access_log=False)
    server = uvicorn.Server(config)
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


def test_a_body_declaring_zero_sent_chunked_is_refused_by_either_parser(uvicorn_port: int) -> None:
    """h11 reads the body chunked (the limit refuses it: before, 5,000 bytes passed a 1,000-byte limit); httptools
    refuses such a request itself (400)."""
    answer, failure = exchange(uvicorn_port, "/v1/chat/completions",
                               [b"connection: close", b"content-length: 0", b"transfer-encoding: chunked"],
                               chunked(b"x" * 5000, 500), timeout_s=20)
    assert failure is None and answer.startswith((b"HTTP/1.1 413 ", b"HTTP/1.1 400 ")), (failure, answer[:300])
    if answer.startswith(b"HTTP/1.1 413 "):
        status, _, error = answered(answer)
        assert f"over the limit of {LIMIT} bytes" in error["error"]["message"], answer[:300]


@pytest.mark.parametrize("size", [LIMIT, LIMIT + 1])
def test_a_chunked_body_at_the_limit_passes_and_one_byte_over_is_refused(uvicorn_port: int, size: int) -> None:
    answer, failure = exchange(uvicorn_port, "/v1/chat/completions",
                               [b"connection: close", b"transfer-encoding: chunked"], chunked(b"x" * size, 300),
                               timeout_s=20)
    assert failure is None, (failure, answer[:300])
    assert answer.startswith(b"HTTP/1.1 200 " if size == LIMIT else b"HTTP/1.1 413 "), answer[:300]
