"""Every `kvsched_*` metric the README and docs/*.md name is one kvsched exports: a gauge or counter of the engine's
`/metrics` (kvsched/adapters/vllm/metrics.py), of the compaction middleware (compaction_metrics.py), a labelled
family, or the Ray autoscaler's gauge. A renamed series then fails here rather than in an operator's dashboard."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvsched.adapters.ray.autoscaling import UNSCRAPED_GAUGE
from kvsched.adapters.vllm import compaction_metrics, metrics

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# kvsched_ words that are no metric: the server's marks in a request body, the trace header's version key.
NOT_METRICS = {"kvsched_tenant", "kvsched_compacted", "kvsched_trace"}


def exported() -> set[str]:
    """Sample names of a scrape with every series on (tier and levels configured), as Prometheus would store them."""
    stats = {name: 1 for name in (*metrics.GAUGES, *metrics.COUNTERS)} | {"tier_disabled_reason": "x"}
    names = {UNSCRAPED_GAUGE}
    text = metrics.render_metrics(stats, api_side={n: 1 for n in metrics.API_SIDE}).decode()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples}
    for kind in (compaction_metrics.GAUGES, compaction_metrics.COUNTERS):
        names |= {f"kvsched_compaction_{n}" for n in kind} | {f"kvsched_compaction_{n}_total" for n in kind}
    source = (ROOT / "kvsched/adapters/vllm/compaction_metrics.py").read_text()
    families = re.findall(r'MetricFamily\("(kvsched_[a-z_]+)"', source)
    return names | set(families) | {f"{f}_total" for f in families}


def documented() -> set[str]:
    text = "\n".join(path.read_text() for path in DOCS)
    return set(re.findall(r"(?<![\w.])(kvsched_[a-z0-9_]*[a-z0-9])(?![\w*])", text)) - NOT_METRICS


def test_every_documented_metric_is_exported() -> None:
    known = exported()
    assert {"kvsched_retained_hit_tokens_total", "kvsched_pinned_blocks", "kvsched_store_up"} <= known
    missing = sorted(n for n in documented() if n not in known and f"{n}_total" not in known)
    assert not missing, f"metrics the docs name that kvsched does not export: {missing}"
    assert len(documented()) > 40  # the scan itself found them
