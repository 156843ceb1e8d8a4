"""`deadline_get.get`, the stats poll's GET: what it refuses and how it fails, so a bad replica URL, an error status or a
spent deadline reach the poll as the typed errors it counts as a failed read (the drip itself:
tests/ray/test_scrape_deadline.py)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
from collections.abc import Iterator

import pytest

from kvsched.adapters.ray.deadline_get import get
from tests.ray.standin_metrics import QuietHandler


class _Pages(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/metrics?x=1":
            self.send_body(b"ok " + self.headers.get("Authorization", "").encode())
        else:
            self.send_error(404, "no such page")


@pytest.fixture
def base() -> Iterator[str]:
    from http.server import ThreadingHTTPServer

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_reads_the_body_with_the_query_and_headers(base: str) -> None:
    body = get(base + "/metrics?x=1", {"Authorization": "Bearer k"}, time.monotonic() + 5)
    assert body == b"ok Bearer k"


def test_an_error_status_is_urllibs_http_error(base: str) -> None:
    with pytest.raises(urllib.error.HTTPError) as exc:
        get(base + "/nothing", {}, time.monotonic() + 5)
    assert exc.value.code == 404


@pytest.mark.parametrize("url", ["https://127.0.0.1:1/metrics", "ftp://host/x", "http:///metrics", "metrics"])
def test_anything_but_a_plain_http_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="not a plain http URL"):
        get(url, {}, time.monotonic() + 5)


def test_a_spent_deadline_is_a_timeout_before_any_connection(base: str) -> None:
    with pytest.raises(TimeoutError, match="deadline"):
        get(base + "/metrics?x=1", {}, time.monotonic() - 1)


def test_a_closed_port_is_an_os_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: the connection is refused
        with pytest.raises(OSError):
            get(f"http://127.0.0.1:{port}/metrics", {}, time.monotonic() + 5)
