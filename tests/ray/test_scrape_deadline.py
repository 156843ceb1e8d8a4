"""A replica's scrape of its engine meets a /metrics that drips (`StallingProxy` with `drip_s`: a byte every 0.5 s,
for 10x the poll's deadline or more). A socket timeout per read never fires while bytes keep coming; the poll's
deadline bounds the whole read (connect, status line, headers, body), so the poll gives up within it and counts a
failed read, as a hanging scrape does (test_engine_blocked_metrics.py): the replica reports its engine's metrics
unread, with its last counts (its queue, not an idle 0). No lock is held across the read: Ray's routing-stats call
made while the poll reads answers with the last stats at once. No vLLM, no Ray cluster: a small HTTP server stands in
for the engine's /metrics. Bounds are far apart (3x the deadline against a drip of 10x), not timings."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from kvsched.adapters.ray.engine import EngineReplica
from kvsched.adapters.ray.stats import ReplicaStats
from tests.ray.stalling_proxy import StallingProxy
from tests.ray.standin_metrics import QuietHandler

DRIP_S = 0.5
METRICS = ("# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name=\"m\"} 3\n"
           "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 2\n")


class _Engine(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_body(METRICS.encode() if self.path == "/metrics" else b'{"pinned_session_ids": ["s1"]}')


@pytest.fixture
def proxy() -> Iterator[StallingProxy]:
    """The engine's stand-in behind a proxy that drips /metrics while blocked (a byte every DRIP_S)."""
    engine = ThreadingHTTPServer(("127.0.0.1", 0), _Engine)
    engine.daemon_threads = True
    threading.Thread(target=engine.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    p = StallingProxy(engine.server_address[1], drip_s=DRIP_S)
    try:
        yield p
    finally:
        p.close()
        engine.shutdown()
        engine.server_close()


def until(what: str, probe: Any, limit_s: float = 30.0) -> None:
    """Waits for `probe()` to hold (an ordering wait, bounded so a broken proxy fails instead of hanging)."""
    deadline = time.monotonic() + limit_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {limit_s:g} s")
        time.sleep(0.02)


@pytest.mark.parametrize("drip", ["head", "body"])
def test_a_dripping_scrape_gives_up_at_its_deadline_as_a_failed_read(proxy: StallingProxy, drip: str) -> None:
    deadline_s = 1.0
    proxy.drip, proxy.drip_bytes = drip, int(10 * deadline_s / DRIP_S)  # the body alone drips for 10x the deadline
    stats = ReplicaStats(proxy.base, timeout_s=deadline_s)
    stats.poll()
    assert stats.snapshot()["queue_depth"] == 3.0 and stats.kv_sessions == ["s1"] and stats.health.failures == 0

    proxy.blocked.set()
    raised: list[BaseException] = []

    def poll() -> None:
        try:
            stats.poll()
        except BaseException as exc:  # noqa: BLE001 - looked at below
            raised.append(exc)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t.join(3 * deadline_s)
    assert not t.is_alive(), f"the poll still reads after 3x its deadline ({proxy.dripped} bytes dripped so far)"
    assert len(raised) == 1 and isinstance(raised[0], TimeoutError), raised
    assert proxy.stalls == 1 and proxy.dripped < proxy.drip_bytes  # it met the drip, and left before its end
    until("the poll's connection closed", lambda: proxy.stalled_now == 0)  # the drip's next send fails
    assert stats.health.failures == 1 and stats.health.state(stats.clock()) == "failing"
    snap = stats.snapshot()
    assert snap["ttft_unread_s"] > 0 and snap["queue_depth"] == 3.0 and snap["kv_sessions"] == ["s1"], snap

    proxy.blocked.clear()
    stats.poll()
    assert stats.health.failures == 0 and stats.snapshot()["ttft_unread_s"] == 0.0


def test_routing_stats_answer_while_the_replicas_poll_meets_a_drip(proxy: StallingProxy) -> None:
    """Ray's routing-stats call (5-s timeout) made while the autoscaling call's poll reads a dripping /metrics: it
    answers with the last stats, the poll still reading; the autoscaling call returns within 3x the poll's deadline
    (the drip would last 10x), reporting the engine's metrics unread with its last queue."""
    deadline_s = 2.0
    proxy.drip_bytes = int(10 * deadline_s / DRIP_S)
    replica = EngineReplica.__new__(EngineReplica)  # no vLLM: only what Ray polls, over the stand-in's HTTP
    replica.pool = "w"
    replica.stats = ReplicaStats(proxy.base, timeout_s=deadline_s)
    replica.routing_wait_s = 0.1  # (2.0 s in production; far from the poll's deadline here, to order the two)

    async def run() -> None:
        first = await replica.record_autoscaling_stats()
        assert first["queue_depth"] == 3.0 and first["ttft_unread_s"] == 0.0, first
        proxy.blocked.set()
        replica._polled_at = 0.0  # past the 1-s reuse: the next call polls
        auto = asyncio.create_task(replica.record_autoscaling_stats())
        while not proxy.stalls:
            await asyncio.sleep(0.02)
        routing = await asyncio.wait_for(replica.record_routing_stats(), 3 * deadline_s)
        assert not auto.done(), "the routing-stats call waited for the poll"
        assert routing["queue_depth"] == 3.0 and routing["ttft_unread_s"] == 0.0, routing  # the last stats
        blocked = await asyncio.wait_for(auto, 3 * deadline_s)
        assert blocked["ttft_unread_s"] > 0 and blocked["queue_depth"] == 3.0, blocked  # unread, not idle
        assert replica.stats.health.failures == 1 and proxy.dripped < proxy.drip_bytes
        again = await asyncio.wait_for(replica.record_routing_stats(), 3 * deadline_s)  # within the 1-s reuse
        assert again["ttft_unread_s"] > 0 and proxy.stalls == 1, again

    asyncio.run(run())
