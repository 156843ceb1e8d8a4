"""For the unscraped-replica test on a real Ray cluster (imported by Ray's workers by name): a stand-in engine replica
whose stats are kvsched's own, read over real HTTP. Each replica runs a small HTTP server on loopback in place of
vLLM's, answering `/metrics` in vLLM's exposition format and `/kvsched/sessions?pinned_ids=1`; the replica's
`ReplicaStats` polls it over HTTP as it polls `vllm serve`, and the replica's own `record_routing_stats`,
`record_autoscaling_stats` and `describe` report what it read (requests are still answered by `StandInEngine`'s mock).

While a file `rank-<rank>` exists in the block directory, that replica's server closes every connection unanswered:
its engine metrics are unreachable. Every scrape that answers adds first tokens: rank 0 100 under 0.1 s, any other
rank 1000 in (0.5 s, 1 s], so the pool's P95 is under 0.1 s from rank 0 alone and in (0.5 s, 1 s] in any window where
another rank brought first tokens. Ten times as many, so that this holds however the replicas' polls fall: the pool
merges each replica's rate over its own window, and the slow share stays over 5% unless rank 0 is polled 190 times
as often per second as another rank (its polls are at most one a second). With equal counts it held only while the
two were polled at about the same pace."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kvsched.adapters.ray.engine import EngineReplica, replica_rank
from kvsched.adapters.ray.stats import ReplicaStats
from tests.ray.standin_engine import StandInEngine

BOUNDS = ("0.1", "0.5", "1.0", "2.5", "+Inf")
SLOW_PER_SCRAPE = 1000  # first tokens in (0.5 s, 1 s] a rank other than 0 adds per answered scrape (rank 0: 100 fast)


def metrics_text(rank: int, scrapes: int) -> str:
    """vLLM's TTFT histogram and queue gauges after `scrapes` answered scrapes."""
    n = (100 if rank == 0 else SLOW_PER_SCRAPE) * scrapes
    lines = ["# TYPE vllm:time_to_first_token_seconds histogram"]
    for b in BOUNDS:
        count = n if rank == 0 or b not in ("0.1", "0.5") else 0
        lines.append(f'vllm:time_to_first_token_seconds_bucket{{le="{b}",model_name="m"}} {count}')
    lines += ["# TYPE vllm:num_requests_waiting gauge", 'vllm:num_requests_waiting{model_name="m"} 0',
              "# TYPE vllm:num_requests_running gauge", 'vllm:num_requests_running{model_name="m"} 0']
    return "\n".join(lines) + "\n"


class QuietHandler(BaseHTTPRequestHandler):
    """A stand-in engine's handler: answers 200 with a body, logs nothing (the tests' output stays readable)."""

    def send_body(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class _EngineEndpoint(QuietHandler):
    server: _EngineServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.server.blocked():
            self.close_connection = True  # no answer at all: the client reads a closed connection
            return
        if self.path == "/metrics":
            self.server.scrapes += 1
            body = metrics_text(replica_rank(), self.server.scrapes).encode()
        else:
            body = json.dumps({"pinned_session_ids": []}).encode()
        self.send_body(body)


class _EngineServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, block_dir: str) -> None:
        super().__init__(("127.0.0.1", 0), _EngineEndpoint)
        self.block_dir = Path(block_dir)
        self.scrapes = 0

    def blocked(self) -> bool:
        return (self.block_dir / f"rank-{replica_rank()}").exists()


class MetricsStandInEngine(StandInEngine):
    def __init__(self, pool: str, engine: dict[str, Any], unscraped_grace_s: float, ttft_hold_s: float,
                 block_dir: str) -> None:
        super().__init__(pool, engine)
        self.unscraped_grace_s = unscraped_grace_s
        self.endpoint = _EngineServer(block_dir)
        threading.Thread(target=self.endpoint.serve_forever, name="standin-metrics", daemon=True).start()
        self.stats = ReplicaStats(f"http://127.0.0.1:{self.endpoint.server_address[1]}", hold_s=ttft_hold_s)

    record_routing_stats = EngineReplica.record_routing_stats  # kvsched's own (StandInEngine fixes them)
    record_autoscaling_stats = EngineReplica.record_autoscaling_stats
    describe = EngineReplica.describe
