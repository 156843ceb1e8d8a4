"""A real engine replica (`EngineReplica`, its `vllm serve --scheduler kvsched` on the tiny model) whose `/metrics`
hangs: a proxy in front of the engine (`stalling_proxy.py`) accepts the scrape's connection and never answers,
everything else passes. The replica's own autoscaling path (`record_autoscaling_stats` -> `_fresh_stats` ->
`ReplicaStats.poll`, its default deadline) gives up at its deadline, reports the engine's metrics unread
(`ttft_unread_s` > 0, `describe` "failing") with its last counts, and the policy fed the replica's own reports holds
the pool (no scale-down while the replica cannot be read) where the same replica read is idle and scaled down;
meanwhile the engine answers completions sent while the scrape hangs. Read again, the replica reports "ok".

Closed or refused connections on a real Ray cluster, with stand-in engines: test_serve_unscraped.py; this is the
hanging one on a real vLLM engine (the policy is given the reports as Ray's context carries them:
test_autoscaling_signals.fleet_ctx).

The same replica's `/metrics` dripping (`drip_s`: a byte every 0.5 s, for 10x the poll's deadline): the poll gives up
at its deadline (`poll_deadline_s` 2 s, as `build_app` passes the router setting) and counts a failed read while the
engine serves completions sent during the drip; the session list, read beside the dripping scrape from the real
engine's `/kvsched/sessions`, still reaches the routing stats (read one after the other, it waited behind the drip
and stayed stale). What the stand-in tests (test_scrape_deadline.py, test_poll_sessions.py) do not show: vLLM's own
API server answering the session listing and completions while one of its connections drips, and the setting reaching
a real replica. Both tests share one replica (a vllm serve start-up fewer in the suite)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from kvsched.adapters.ray.autoscaling import QueueTTFTPolicy
from kvsched.adapters.ray.config import EngineConfig
from kvsched.adapters.ray.engine import EngineReplica
from tests.ray.shared_cluster import Early, early
from tests.ray.stalling_proxy import StallingProxy
from tests.ray.test_autoscaling_signals import fleet_ctx

pytestmark = pytest.mark.integration
DEADLINE_S = 2.0  # the replica's poll_deadline_s (the router setting)
DRIP_S = 0.5
BODY = json.dumps({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "tool result " * 30}]})


async def until(what: str, probe: Any, limit_s: float = 60.0) -> None:
    """Waits for `probe()` to hold (an ordering wait, bounded so a broken proxy fails instead of hanging)."""
    deadline = time.monotonic() + limit_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {limit_s:g} s")
        await asyncio.sleep(0.05)


def decide(window: list[dict[str, float]]) -> tuple[int, str]:
    """The policy's decision for a pool of this one replica (`r0`), min 0, from its reports 10 s apart."""
    ctx = fleet_ctx([{k: {"r0": v} for k, v in report.items()} for report in window], now=1000.0)
    n, state = QueueTTFTPolicy(min_replicas=0, max_replicas=2, ttft_p95_s=2.0)(ctx)
    return n, state["kvsched_reason"]


def start_replica() -> EngineReplica:
    from kvsched.tiny_model import ensure_tiny_model
    from tests.vllm_layout import worker

    cfg = EngineConfig(model=str(ensure_tiny_model("test")), served_model_name="tiny", max_model_len=512,
                       block_size=32, worker=worker())
    return EngineReplica("tiny", cfg.model_dump(), poll_deadline_s=DEADLINE_S)


EARLY = {"replica": Early(start_replica, lambda replica: replica.__del__())}


@pytest.fixture(scope="module")
def replica() -> Iterator[EngineReplica]:
    """One engine replica for the module's two real-engine tests (a vllm serve start-up each saved: the suite's time),
    given `poll_deadline_s` 2 s as `build_app` passes the router setting; each test puts its own proxy in front and
    asserts on counts relative to what it found (the other test may have run first). It starts beside the
    package's other start-ups (shared_cluster.py)."""
    rep: EngineReplica = early(sys.modules[__name__], "replica")
    try:
        yield rep
    finally:
        rep.__del__()


def behind(replica: EngineReplica, proxy: StallingProxy) -> None:
    """The engine behind `proxy`, for the replica's polls and its requests alike."""
    replica.stats.base_url = proxy.base
    replica.client = httpx.AsyncClient(base_url=proxy.base, timeout=httpx.Timeout(None, connect=10.0))


def test_a_hanging_metrics_scrape_times_out_is_unread_not_idle_and_the_engine_serves(replica: EngineReplica) -> None:
    proxy = StallingProxy(int(urlsplit(replica.server.base).port or 0))
    behind(replica, proxy)
    headers = {"X-Session-Id": "blocked/worker", "Content-Type": "application/json", "Authorization": "Bearer any"}

    async def report() -> dict[str, float]:
        await asyncio.sleep(1.1)  # past the stats' 1-s reuse (`_fresh_stats`' max_age_s): this report scrapes
        return await asyncio.wait_for(replica.record_autoscaling_stats(), 60)

    async def run() -> None:
        reports = [await report()]  # the baseline
        assert reports[0]["ttft_unread_s"] == 0.0 and replica.describe()["engine_metrics"] == "ok"
        assert replica.stats.health.failures == 0  # (failed reads in a row: none after a read, whatever ran before)
        assert (await replica.complete("/v1/chat/completions", BODY.encode(), headers))["status"] == 200
        reports.append(await report())
        served = reports[0]["ttft_le:+Inf"]  # first tokens served before (by this module's other test, if it ran)
        assert reports[1]["ttft_le:+Inf"] == served + 1 and reports[1]["ttft_unread_s"] == 0.0

        proxy.blocked.set()
        t0 = time.monotonic()
        scrape = asyncio.create_task(report())
        await until("stalled /metrics request", lambda: proxy.stalled_now)
        answers = [await replica.complete("/v1/chat/completions", BODY.encode(), headers) for _ in range(2)]
        assert [a["status"] for a in answers] == [200, 200] and all(json.loads(a["body"])["choices"] for a in answers)
        assert proxy.sent_while_stalled > 0  # the completions went to the engine while the scrape hung
        blocked = await scrape
        print(f"blocked scrape: record_autoscaling_stats returned after {time.monotonic() - t0 - 1.1:.2f} s "
              f"(ReplicaStats.poll's deadline: {replica.stats.timeout_s:g} s); proxy stalls {proxy.stalls}")
        # the scrape gave up and closed its connection (the proxy's thread may see the close a moment later: on a
        # loaded machine it had not yet when the poll returned, a failure in a run beside vLLM start-ups)
        await until("the stalled connection closed", lambda: proxy.stalled_now == 0)
        assert proxy.stalls == 1
        assert replica.stats.health.failures == 1  # (the poll's TimeoutError is logged: the test below has its type)
        assert blocked["ttft_unread_s"] > 0 and replica.describe()["engine_metrics"] == "failing"
        assert blocked["ttft_le:+Inf"] == served + 1 and blocked["queue_depth"] == 0.0  # its last counts, not current
        n, reason = decide([*reports, blocked])
        assert n == 1 and reason.startswith("steady: no scale-down while replica(s) r0 cannot be read"), reason
        n, reason = decide(reports)  # the same replica read: idle, the pool may go
        assert n == 0 and reason.startswith("down:"), reason

        proxy.blocked.clear()
        again = await report()
        assert again["ttft_unread_s"] == 0.0 and replica.describe()["engine_metrics"] == "ok"
        assert again["ttft_le:+Inf"] == served + 3  # the first tokens served while unread count now
        n, reason = decide([*reports, again])
        assert n == 0 and reason.startswith("down:"), reason

    try:
        asyncio.run(run())
    finally:
        proxy.close()


def test_a_dripping_scrape_is_unread_while_the_engine_serves_and_its_session_list_still_reaches_the_router(
        replica: EngineReplica) -> None:
    assert replica.stats.timeout_s == DEADLINE_S  # the router setting reached the replica's poll
    proxy = StallingProxy(int(urlsplit(replica.server.base).port or 0), drip_s=DRIP_S,
                          drip_bytes=int(10 * DEADLINE_S / DRIP_S))
    behind(replica, proxy)

    def headers(session: str) -> dict[str, str]:
        return {"X-Session-Id": session, "Content-Type": "application/json", "Authorization": "Bearer any"}

    async def report() -> dict[str, float]:
        await asyncio.sleep(1.1)  # past the stats' 1-s reuse (`_fresh_stats`' max_age_s): this report polls
        return await asyncio.wait_for(replica.record_autoscaling_stats(), 60)

    async def run() -> None:
        first = await report()
        assert first["ttft_unread_s"] == 0.0 and "drip/before" not in replica.stats.snapshot()["kv_sessions"]
        # Failed reads are counted in a row (`ScrapeHealth.failures`): this read started them over, whatever the
        # module's other test left (found under load: counted from before this read, after that test had failed with
        # its blocked poll counted and not read again, the count was one short).
        assert replica.stats.health.failures == 0

        proxy.blocked.set()
        done = await replica.complete("/v1/chat/completions", BODY.encode(), headers("drip/before"))
        assert done["status"] == 200  # a turn that ends before the poll: its session pinned on the engine
        t0 = time.monotonic()
        scrape = asyncio.create_task(report())
        await until("dripping /metrics request", lambda: proxy.stalled_now)
        during = await replica.complete("/v1/chat/completions", BODY.encode(), headers("drip/during"))
        assert during["status"] == 200 and json.loads(during["body"])["choices"]
        assert proxy.sent_while_stalled > 0  # the completion went to the engine while the scrape dripped
        blocked = await scrape
        print(f"dripping scrape: record_autoscaling_stats returned after {time.monotonic() - t0 - 1.1:.2f} s "
              f"(poll_deadline_s {DEADLINE_S:g}); {proxy.dripped} of {proxy.drip_bytes} bytes dripped")
        assert proxy.stalls == 1 and proxy.dripped < proxy.drip_bytes  # it met the drip and left before its end
        assert replica.stats.health.failures == 1 and blocked["ttft_unread_s"] > 0
        assert replica.describe()["engine_metrics"] == "failing"
        routing = await asyncio.wait_for(replica.record_routing_stats(), 30)  # within the 1-s reuse: that poll's
        assert "drip/before" in routing["kv_sessions"], routing  # read beside the drip (one after: [])
        await until("the dripping connection closed", lambda: proxy.stalled_now == 0)

        proxy.blocked.clear()
        again = await report()
        assert again["ttft_unread_s"] == 0.0 and replica.describe()["engine_metrics"] == "ok"
        assert {"drip/before", "drip/during"} <= set(replica.stats.snapshot()["kv_sessions"])

    try:
        asyncio.run(run())
    finally:
        proxy.close()


def test_the_replicas_poll_raises_the_sockets_timeout_on_a_hanging_scrape() -> None:
    """The same `ReplicaStats.poll`, against the proxy in front of a port that never gets the request: a read timeout
    (TimeoutError: the poll's deadline), counted as a failed read; the call returns (a hang fails the join's bound)."""
    from kvsched.adapters.ray.stats import ReplicaStats

    proxy = StallingProxy(upstream_port=9)  # nothing is forwarded: /metrics is stalled, and that is all it asks
    proxy.blocked.set()
    stats = ReplicaStats(proxy.base)
    raised: list[BaseException] = []

    def poll() -> None:
        try:
            stats.poll(timeout_s=1.0)
        except BaseException as exc:  # noqa: BLE001 - looked at below
            raised.append(exc)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t.join(60)
    proxy.close()
    assert not t.is_alive() and len(raised) == 1 and isinstance(raised[0], TimeoutError), raised
    assert proxy.stalls == 1 and stats.health.failures == 1 and stats.health.last_ok_s is None
