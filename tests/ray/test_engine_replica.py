"""One engine replica outside Ray: its vLLM child serves, and the stats it reports to the router name the sessions
whose KV kvsched pinned there, with queue depth and a recent P95 TTFT. (The replica starts beside the package's other
start-ups: shared_cluster.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import pytest

from kvsched.adapters.ray.config import EngineConfig
from kvsched.adapters.ray.engine import EngineReplica
from tests.ray.shared_cluster import Early, early
from tests.vllm_layout import DEFAULT_LAYOUT, runs_worker_apart

pytestmark = pytest.mark.integration


def start_replica() -> EngineReplica:
    from kvsched.tiny_model import ensure_tiny_model

    # the CPU build's own layout (the worker in a process of its own), where the suite's other replicas run it in the
    # engine core (tests/vllm_layout.py): the replica's process-group handling is checked with all three processes
    cfg = EngineConfig(model=str(ensure_tiny_model("test")), served_model_name="tiny", max_model_len=512,
                       block_size=32, worker=DEFAULT_LAYOUT)
    return EngineReplica("tiny", cfg.model_dump())


EARLY = {"replica": Early(start_replica, lambda replica: replica.__del__())}


def test_engine_replica_proxies_and_reports_pinned_sessions() -> None:
    replica: EngineReplica = early(sys.modules[__name__], "replica")
    pid = replica.server.proc.pid if replica.server.proc else None
    try:
        # its own process group (stopped as a unit), in the replica's session: with a session of its own it had a CPU
        # share of its own under Linux's autogroup scheduler, and a busy engine starved the Ray processes relaying to it
        assert pid is not None and os.getpgid(pid) == pid and os.getsid(pid) == os.getsid(0)
        assert runs_worker_apart(pid)  # API server, engine core and worker

        async def run() -> None:
            # Ray asks for stats from the replica's start: the first scrape is a baseline (what the engine served
            # before it does not count, as in Prometheus's rate()), so no P95 yet
            first = await replica.record_routing_stats()
            assert first["slot"] == 0 and first["ttft_p95_s"] is None
            body = json.dumps({"model": "tiny", "max_tokens": 4,
                               "messages": [{"role": "user", "content": "tool result " * 30}]}).encode()
            res = await replica.complete("/v1/chat/completions", body, {"X-Session-Id": "wf9/worker",
                                                                        "Content-Type": "application/json",
                                                                        "Authorization": "Bearer any"})
            assert res["status"] == 200 and json.loads(res["body"])["choices"]
            chunks = [c async for c in replica.stream("/v1/chat/completions",
                                                      body.replace(b'"max_tokens": 4', b'"stream": true, '
                                                                   b'"max_tokens": 4'), {})]
            assert chunks[0]["status"] == 200 and b"data:" in b"".join(chunks[1:])
            await asyncio.sleep(1.1)  # past the stats' 1-s reuse (_fresh_stats' max_age_s): the next call scrapes
            stats = await replica.record_routing_stats()
            assert stats["slot"] == 0 and "wf9/worker" in stats["kv_sessions"]
            assert stats["queue_depth"] == 0 and stats["ttft_p95_s"] is not None and stats["ttft_p95_s"] > 0
            auto = await replica.record_autoscaling_stats()
            buckets = {k: v for k, v in auto.items() if k.startswith("ttft_le:")}
            assert set(auto) - set(buckets) == {"queue_depth", "ttft_p95_s", "ttft_unread_s"}  # no fresh P95: two
            assert auto["ttft_unread_s"] == 0.0  # its engine's metrics read at its last poll
            assert replica.describe()["engine_metrics"] == "ok"
            # and vLLM's TTFT bucket counts, cumulative, for the policy to merge into the fleet's P95
            assert buckets["ttft_le:+Inf"] == 2 and len(buckets) > 10 and max(buckets.values()) == 2
            replica.check_health()

        asyncio.run(run())
    finally:
        replica.__del__()
    assert pid is not None and replica.server.proc is not None and replica.server.proc.poll() is not None
    with pytest.raises(RuntimeError, match="exited"):
        replica.check_health()
