"""What an engine replica reports about itself, read from its own vLLM server: queue depth, recent P95 TTFT and the
sessions whose KV kvsched keeps pinned there.

TTFT comes from vLLM's `vllm:time_to_first_token_seconds` histogram: the P95 of the requests that finished their first
token since the previous poll (bucket deltas), held for `hold_s` when nothing new arrived so an idle poll does not
read as "fast".
"""

from __future__ import annotations

import json
import math
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvsched.serving import parse_prometheus

TTFT_BUCKET = "vllm:time_to_first_token_seconds_bucket"


def ttft_buckets(samples: Mapping[str, float]) -> dict[float, float]:
    """Cumulative TTFT histogram counts by upper bound (summed over label sets)."""
    out: dict[float, float] = {}
    for key, value in samples.items():
        if not key.startswith(TTFT_BUCKET + "{"):
            continue
        le = _label(key, "le")
        if le is None:
            continue
        bound = math.inf if le in ("+Inf", "inf") else float(le)
        out[bound] = out.get(bound, 0.0) + value
    return out


def _label(key: str, name: str) -> str | None:
    marker = f'{name}="'
    at = key.find(marker)
    if at < 0:
        return None
    rest = key[at + len(marker):]
    return rest[: rest.find('"')]


def histogram_quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """Quantile of a cumulative histogram, interpolated inside the bucket (as Prometheus does)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for b in bounds:
        c = buckets[b]
        if c >= rank:
            if math.isinf(b):
                return prev_bound
            width = c - prev_count
            return prev_bound + (b - prev_bound) * ((rank - prev_count) / width if width > 0 else 1.0)
        prev_bound, prev_count = b, c
    return prev_bound


@dataclass
class ReplicaStats:
    """Polled from one vLLM server; `snapshot()` is what the replica reports to Ray."""

    base_url: str
    hold_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    queue_depth: float = 0.0
    running: float = 0.0
    ttft_p95_s: float | None = None
    kv_sessions: list[str] = field(default_factory=list)
    _last_buckets: dict[float, float] = field(default_factory=dict)
    _ttft_at: float = -math.inf

    def update(self, metrics_text: str, sessions: Mapping[str, Any] | None) -> None:
        samples = parse_prometheus(metrics_text)
        self.queue_depth = samples.get("vllm:num_requests_waiting", 0.0)
        self.running = samples.get("vllm:num_requests_running", 0.0)
        buckets = ttft_buckets(samples)
        delta = {b: c - self._last_buckets.get(b, 0.0) for b, c in buckets.items()}
        self._last_buckets = buckets
        p95 = histogram_quantile(delta, 0.95)
        now = self.clock()
        if p95 is not None:
            self.ttft_p95_s, self._ttft_at = p95, now
        elif now - self._ttft_at > self.hold_s:
            self.ttft_p95_s = None
        if sessions is not None:
            self.kv_sessions = sorted(str(r["session_id"]) for r in sessions.get("sessions", ())
                                      if r.get("pinned_blocks", 0) > 0)

    def poll(self, timeout_s: float = 5.0) -> None:
        """Blocking: read /metrics and /kvsched/sessions (run it in a thread)."""
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
        try:
            with urllib.request.urlopen(self.base_url + "/kvsched/sessions", timeout=timeout_s) as r:
                sessions = json.loads(r.read())
        except (OSError, ValueError):
            sessions = None  # stock vLLM (no kvsched scheduler) or busy: keep the last list
        self.update(text, sessions)

    def snapshot(self) -> dict[str, Any]:
        return {"queue_depth": self.queue_depth, "running": self.running, "ttft_p95_s": self.ttft_p95_s,
                "kv_sessions": list(self.kv_sessions)}
