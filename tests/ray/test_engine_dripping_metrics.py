"""A real engine replica (`EngineReplica`, its `vllm serve --scheduler kvsched` on the tiny model) whose `/metrics`
drips: a proxy in front of the engine (`stalling_proxy.py`, `drip_s`) answers the scrape a byte every 0.5 s, for 10x
the poll's deadline; everything else passes. The replica is given `poll_deadline_s` 2 s (the router setting, as
`build_app` passes it). Its poll gives up at that deadline and counts a failed read (the engine's metrics unread,
"failing"), while the engine serves completions sent during the drip; and the session list, read beside the dripping
scrape from the real engine's `/kvsched/sessions`, still reaches the routing stats: a session that finished a turn
just before is named there. Read one after the other, the list waited behind the drip and stayed stale.

What the stand-in tests (test_scrape_deadline.py, test_poll_sessions.py) do not show: vLLM's own API server answering
the session listing and completions while one of its connections drips, and the setting reaching a real replica."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from kvsched.adapters.ray.config import EngineConfig
from kvsched.adapters.ray.engine import EngineReplica
from tests.ray.stalling_proxy import StallingProxy

pytestmark = pytest.mark.integration
DEADLINE_S = 2.0
DRIP_S = 0.5
BODY = json.dumps({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "tool result " * 30}]})


async def until(what: str, probe: Any, limit_s: float = 60.0) -> None:
    """Waits for `probe()` to hold (an ordering wait, bounded so a broken proxy fails instead of hanging)."""
    deadline = time.monotonic() + limit_s
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {limit_s:g} s")
        await asyncio.sleep(0.05)


def test_a_dripping_scrape_is_unread_while_the_engine_serves_and_its_session_list_still_reaches_the_router(
        tiny_model_dir: Path) -> None:
    cfg = EngineConfig(model=str(tiny_model_dir), served_model_name="tiny", max_model_len=512, block_size=32)
    replica = EngineReplica("tiny", cfg.model_dump(), poll_deadline_s=DEADLINE_S)
    assert replica.stats.timeout_s == DEADLINE_S
    proxy = StallingProxy(int(urlsplit(replica.server.base).port or 0), drip_s=DRIP_S,
                          drip_bytes=int(10 * DEADLINE_S / DRIP_S))
    replica.stats.base_url = proxy.base  # the engine behind the proxy, for the replica's polls and its requests alike
    replica.client = httpx.AsyncClient(base_url=proxy.base, timeout=httpx.Timeout(None, connect=10.0))

    def headers(session: str) -> dict[str, str]:
        return {"X-Session-Id": session, "Content-Type": "application/json", "Authorization": "Bearer any"}

    async def report() -> dict[str, float]:
        await asyncio.sleep(1.1)  # past the stats' 1-s reuse (`_fresh_stats`' max_age_s): this report polls
        return await asyncio.wait_for(replica.record_autoscaling_stats(), 60)

    async def run() -> None:
        first = await report()
        assert first["ttft_unread_s"] == 0.0 and replica.stats.snapshot()["kv_sessions"] == []

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
        replica.__del__()
