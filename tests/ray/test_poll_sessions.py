"""A replica's poll reads its engine's /metrics and its session list side by side, each within the poll's whole
deadline, and applies the list whatever /metrics did: the router reads only the list (which sessions this replica
pins keeps a session's turns where its KV is). Found by review: read one after the other, the sessions read got what
/metrics left of the deadline, so a /metrics answering late starved it and the router kept a stale list, and a
/metrics that hung kept it stale for as long as it hung. No vLLM, no Ray: a small HTTP server stands in for the engine.
The asserts are on outcomes (the list was updated); the stand-in's delays are far apart: /metrics answers at 0.7 of
the deadline and the list takes 0.45 of it, so read after /metrics it cannot arrive in time (1.15 of the deadline),
read beside it it can."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer

import pytest

from kvsched.adapters.ray.stats import ReplicaStats
from tests.ray.standin_metrics import QuietHandler

DEADLINE_S = 4.0  # slack of 1.2 s for /metrics and 2.2 s for the list: no flake on a loaded 2-core machine
METRICS = b'# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 3\n'


@dataclass
class Behaviour:
    metrics_after_s: float | None = 0.0  # None: /metrics never answers (a hung endpoint)
    sessions_after_s: float = 0.0
    sessions_body: bytes = b'{"pinned_session_ids": ["s1", "s2"]}'
    released: threading.Event = field(default_factory=threading.Event)  # set at teardown: a hung /metrics handler ends


class _Engine(QuietHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        b = self.server.behaviour
        if self.path == "/metrics":
            if b.metrics_after_s is None:
                b.released.wait()
                return
            time.sleep(b.metrics_after_s)
            self.send_body(METRICS)
        else:
            time.sleep(b.sessions_after_s)
            self.send_body(b.sessions_body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    behaviour: Behaviour


@pytest.fixture
def engine() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Engine)
    server.behaviour = Behaviour(released=threading.Event())
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield server
    finally:
        server.behaviour.released.set()
        server.shutdown()
        server.server_close()


def stats_of(server: _Server) -> ReplicaStats:
    return ReplicaStats(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=DEADLINE_S)


def test_a_metrics_read_using_most_of_the_deadline_leaves_the_sessions_read_its_own(engine: _Server) -> None:
    engine.behaviour.metrics_after_s = 0.7 * DEADLINE_S
    engine.behaviour.sessions_after_s = 0.45 * DEADLINE_S
    stats = stats_of(engine)
    stats.poll()
    snap = stats.snapshot()
    assert snap["kv_sessions"] == ["s1", "s2"], snap  # read one after the other: [] (the sessions read timed out)
    assert snap["queue_depth"] == 3.0 and stats.health.failures == 0, snap  # and /metrics was read too


def test_a_hung_metrics_read_still_updates_the_session_list(engine: _Server) -> None:
    """/metrics never answers: the poll fails at its deadline (the engine's metrics unread, its last counts kept),
    and the router gets the list the engine gave meanwhile."""
    stats = stats_of(engine)
    stats.poll()
    assert stats.snapshot()["kv_sessions"] == ["s1", "s2"]
    engine.behaviour.metrics_after_s = None
    engine.behaviour.sessions_body = b'{"pinned_session_ids": ["s3"]}'
    with pytest.raises(TimeoutError):
        stats.poll()
    snap = stats.snapshot()
    assert snap["kv_sessions"] == ["s3"], snap  # read one after the other: still ["s1", "s2"]
    assert stats.health.failures == 1 and snap["ttft_unread_s"] > 0 and snap["queue_depth"] == 3.0, snap


@pytest.mark.parametrize("body", [b"[]", b'{"pinned_session_ids": 5}', b'{"sessions": {"a": 1}}', b'"s1"', b"{"])
def test_a_session_listing_of_another_shape_keeps_the_last_list_and_the_scrape(engine: _Server, body: bytes) -> None:
    """An answer that is not the engine's listing (a proxy's page, another server's JSON) is a failed sessions read:
    the last list stays, the scrape applies. Found writing this: a JSON list raised AttributeError out of the poll,
    losing its scrape."""
    stats = stats_of(engine)
    stats.poll()
    engine.behaviour.sessions_body = body
    stats.poll()
    assert stats.snapshot()["kv_sessions"] == ["s1", "s2"] and stats.health.failures == 0


def test_rows_without_pinned_ids_count_sessions_with_pinned_blocks(engine: _Server) -> None:
    """An engine answering rows (no `pinned_session_ids`): the sessions with pinned blocks, whatever else a row
    holds (a non-numeric count, no id) left out."""
    engine.behaviour.sessions_body = (b'{"sessions": [{"session_id": "b", "pinned_blocks": 2}, {"session_id": "a", '
                                      b'"pinned_blocks": 0}, {"session_id": "c", "pinned_blocks": "3"}, '
                                      b'{"pinned_blocks": 1}, {"session_id": "d", "pinned_blocks": true}]}')
    stats = stats_of(engine)
    stats.poll()
    assert stats.snapshot()["kv_sessions"] == ["b"]
