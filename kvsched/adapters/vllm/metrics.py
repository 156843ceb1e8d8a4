"""Renders kvsched's scheduler statistics as Prometheus `kvsched_*` metrics for vLLM's `/metrics`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_latest_openmetrics

GAUGES = {
    "active_sessions": "Sessions in kvsched's session table",
    "pinned_sessions": "Sessions whose KV is pinned between turns",
    "pinned_blocks": "KV blocks held by session pins",
    "pin_budget_blocks": "Most KV blocks pins may hold",
    "kv_bytes_per_token": "KV bytes per token across layers, from the engine's KV cache spec (follows --kv-cache-dtype); "
                          "the byte cost eviction scores use",
}
COUNTERS = {
    "sessions_seen": "Distinct sessions seen",
    "requests_with_session": "Requests that named a session",
    "retained_hits": "Turns that started on KV kvsched had retained",
    "retained_hit_tokens": "Prompt tokens served from KV kvsched had retained (prefill saved)",
    "rejected_requests": "Requests refused for malformed session input (HTTP 400)",
}
RELEASE_REASONS = ("turn", "ttl", "end", "pressure", "budget")


class _StatsCollector:
    def __init__(self, stats: Mapping[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"kvsched_{name}", doc, value=float(self.stats.get(name, 0)))
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"kvsched_{name}", doc, value=float(self.stats.get(name, 0)))
        released = CounterMetricFamily("kvsched_pin_releases", "Session pins released whole, by reason",
                                       labels=["reason"])
        partial = CounterMetricFamily("kvsched_pin_partial_releases", "Session pins shortened (tail blocks released), "
                                      "by reason", labels=["reason"])
        blocks = CounterMetricFamily("kvsched_pin_released_blocks", "KV blocks released from session pins, by reason",
                                     labels=["reason"])
        for reason in RELEASE_REASONS:
            released.add_metric([reason], float(self.stats.get(f"released_{reason}", 0)))
            partial.add_metric([reason], float(self.stats.get(f"released_{reason}_partial", 0)))
            blocks.add_metric([reason], float(self.stats.get(f"released_blocks_{reason}", 0)))
        yield released
        yield partial
        yield blocks


def render_metrics(stats: Mapping[str, Any], openmetrics: bool = False) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats))  # type: ignore[arg-type]
    if openmetrics:
        text = generate_latest_openmetrics(registry)
        return text[: -len(b"# EOF\n")] if text.endswith(b"# EOF\n") else text
    return generate_latest(registry)
