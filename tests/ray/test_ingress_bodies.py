"""Bodies over the limit, slow, lying about their length or compressed, through kvsched's Ray Serve ingress on the
package's cluster (real Ray on loopback, Ray's HTTP proxy on uvicorn, a stand-in engine replica: what is probed is the
ingress). Each gets a 4xx with a message that the client reads before the connection closes, and the ingress serves
the next good request (`kvsched/adapters/ray/ingress_body.py` says what was found and why)."""

from __future__ import annotations

import gzip
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.raw_http import answered, chunked, exchange
from tests.ray.standin_bodies import GOOD, PATH, bodies_app, serves

pytestmark = pytest.mark.integration
LIMIT = 1 << 20  # the app's max_body_bytes
BODY_TIMEOUT_S = 2.0  # the app's body_timeout_s
BIG = json.dumps({"model": "w", "messages": [{"role": "user", "content": "a" * (8 * LIMIT)}]}).encode()


@pytest.fixture(scope="module")
def port(serve_cluster: dict[str, Any]) -> Iterator[int]:
    """The ingress as `build_app` deploys it, with a 1 MiB body limit and a 2 s body timeout, over one stand-in
    engine replica."""
    with bodies_app(serve_cluster, "bodies", LIMIT, BODY_TIMEOUT_S) as port:
        yield port


def test_a_body_over_the_limit_on_a_closing_connection_gets_its_413_not_a_reset(port: int) -> None:
    """Found by probing: with `Connection: close` (or over HTTP/1.0) the client got the 413's first bytes, then
    ECONNRESET (uvicorn closed the socket with the body unread). The ingress now drains the rest (within bounds)
    before it answers: the whole 413, then the connection's end."""
    for version, head, parts in (
            (b"1.1", [b"connection: close", b"content-length: %d" % len(BIG)], [BIG]),
            (b"1.1", [b"connection: close", b"transfer-encoding: chunked"], chunked(BIG)),
            (b"1.0", [b"content-length: %d" % len(BIG)], [BIG])):
        answer, failure = exchange(port, PATH, head, parts, version=version)
        assert failure is None, (version, head, failure, answer[:300])
        status, _, error = answered(answer)
        assert status == 413 and str(LIMIT) in error["error"]["message"], (version, head, answer[:300])
        serves(port)


def test_clients_read_the_413_of_a_body_over_the_limit(port: int, tmp_path: Any) -> None:
    """Sound before: the openai client, httpx (a body in one piece or streamed: chunked) and curl keep their
    connection alive, and uvicorn drops the rest of the body after the answer."""
    import httpx
    import openai

    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(openai.APIStatusError) as refused:
        openai.OpenAI(base_url=url, api_key="k", max_retries=0, timeout=30).chat.completions.create(
            model="w", messages=[{"role": "user", "content": "a" * (8 * LIMIT)}])
    assert refused.value.status_code == 413 and str(LIMIT) in str(refused.value)
    for content in (BIG, iter([BIG[i:i + 65536] for i in range(0, len(BIG), 65536)])):
        r = httpx.post(f"{url}/chat/completions", content=content, headers={"content-type": "application/json"},
                       timeout=30)
        assert r.status_code == 413 and str(LIMIT) in r.json()["error"]["message"], r.text
    (tmp_path / "big.json").write_bytes(BIG)
    for extra in ([], ["-H", "transfer-encoding: chunked"]):
        curl = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", "-H", "content-type: application/json", *extra,
                               "--data-binary", f"@{tmp_path / 'big.json'}", f"{url}/chat/completions"],
                              capture_output=True, text=True, timeout=60, check=False)
        body, _, code = curl.stdout.rpartition("\n")
        assert curl.returncode == 0 and code == "413" and str(LIMIT) in body, (extra, curl)
    serves(port)


def test_a_body_that_does_not_arrive_is_a_408_that_closes_the_connection(port: int) -> None:
    """Found by probing: a Content-Length larger than the body sent, or a body of a byte a second, held the request in
    the ingress for as long as the client kept the connection (no timeout applied: uvicorn has none for a body, Ray's
    `request_timeout_s` is unset by default). Now 408 with a message once `body_timeout_s` passed, the connection
    closed; the ingress serves the next request."""
    for parts, every_s in (([GOOD], 0.0), ([GOOD[i:i + 1] for i in range(len(GOOD))], 0.5)):
        begun = time.monotonic()
        answer, failure = exchange(port, PATH, [b"content-length: %d" % (len(GOOD) + 50)], parts, every_s=every_s,
                                   timeout_s=20)
        took = time.monotonic() - begun
        assert failure is None, (failure, answer[:300])
        status, headers, error = answered(answer)
        assert status == 408 and headers.get("connection") == "close", answer[:300]
        assert f"within {BODY_TIMEOUT_S:g} s" in error["error"]["message"], error
        assert BODY_TIMEOUT_S <= took < BODY_TIMEOUT_S + 10, took
        serves(port)


def test_slow_bodies_filling_the_ingress_hold_it_only_for_the_body_timeout(port: int) -> None:
    """Before: four clients sending their bodies a byte a second held the ingress's four ongoing requests (its
    `max_ongoing_requests` here) for as long as they liked, and a good request waited behind them in Ray's proxy.
    Now each is a 408 after `body_timeout_s`, and the good request is served."""
    slow: list[tuple[bytes, str | None]] = []

    def drip() -> None:
        slow.append(exchange(port, PATH, [b"content-length: %d" % len(GOOD)],
                             [GOOD[i:i + 1] for i in range(len(GOOD))], every_s=1.0, timeout_s=30))

    threads = [threading.Thread(target=drip, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    begun = time.monotonic()
    serves(port)
    assert time.monotonic() - begun < BODY_TIMEOUT_S + 10
    for t in threads:
        t.join(40)
    assert [answered(answer)[0] for answer, _ in slow] == [408] * 4, slow


def test_a_compressed_body_is_a_415_naming_its_encoding_and_never_expanded(port: int) -> None:
    """Found by probing: a gzip body was "not valid JSON" (400): nothing decompresses it (a zip bomb cannot expand), but
    the answer hid the cause. Now 415 naming Content-Encoding; `identity` is no encoding."""
    bomb = gzip.compress(b" " * (64 * LIMIT))  # 64 MiB of spaces in ~64 KiB
    for encoding, body in ((b"gzip", gzip.compress(GOOD)), (b"gzip", bomb), (b"deflate", GOOD), (b"br", GOOD)):
        answer, failure = exchange(port, PATH, [b"connection: close", b"content-encoding: " + encoding,
                                          b"content-length: %d" % len(body)], [body])
        assert failure is None, (encoding, failure)
        status, _, error = answered(answer)
        assert status == 415 and error["error"]["param"] == "content-encoding", (encoding, answer[:300])
    answer, failure = exchange(port, PATH, [b"connection: close", b"content-encoding: identity",
                                      b"content-length: %d" % len(GOOD)], [GOOD])
    assert failure is None and answered(answer)[0] == 200, answer[:300]


def test_a_content_length_shorter_than_the_body_is_a_400(port: int) -> None:
    """Sound before: the declared bytes are the body (not JSON: the ingress's 400); on a kept-alive connection the rest
    is read as the next request, which uvicorn answers 400 ("Invalid HTTP request received.") and closes."""
    answer, failure = exchange(port, PATH, [b"connection: close", b"content-length: 10"], [GOOD])
    assert failure is None, failure
    status, _, error = answered(answer)
    assert status == 400 and "not valid JSON" in error["error"]["message"], answer[:300]
    answer, failure = exchange(port, PATH, [b"content-length: 10"], [GOOD], timeout_s=10)
    assert failure is None and answer.startswith(b"HTTP/1.1 400"), (failure, answer[:600])
    serves(port)
