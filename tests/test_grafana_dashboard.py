"""examples/grafana/kvsched.json: every query names a series that is really exported, by kvsched's vLLM server
(kvsched_* as the metrics code renders them, vllm:* as vLLM's own source defines them) or by Ray Serve (ray_serve_*)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMQL_WORDS = {"rate", "irate", "sum", "by", "without", "max", "min", "avg", "histogram_quantile", "le", "reason",
                "deployment", "increase", "count", "topk", "on", "ignoring", "m", "s"}


def exported_kvsched_names() -> set[str]:
    from prometheus_client import CollectorRegistry, generate_latest

    from kvsched.adapters.vllm import compaction_metrics, metrics
    from kvsched.serving import parse_prometheus

    stats = {k: 1.0 for k in (*metrics.GAUGES, *metrics.COUNTERS)} | {"tier_capacity_bytes": 1.0}
    names = set(parse_prometheus(metrics.render_metrics(stats).decode()))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(compaction_metrics.Collector({}))  # type: ignore[arg-type]
    names |= set(parse_prometheus(generate_latest(registry).decode()))
    return {n.split("{")[0] for n in names}


@functools.cache
def quoted_names(package: str) -> frozenset[str]:
    """Every double-quoted metric-like string in a package's source (read once)."""
    root = Path(__import__(package).__file__).parent
    found: set[str] = set()
    for p in root.rglob("*.py"):
        text = p.read_text(errors="ignore")
        if "metric" in text or "Counter" in text or "Gauge" in text or "Histogram" in text:
            found.update(re.findall(r'"([a-z_:][a-z0-9_:]+)"', text))
    return frozenset(found)


def source_defines(package: str, name: str) -> bool:
    return name in quoted_names(package)


def series(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', "", expr)
    no_ranges = re.sub(r"\[[^\]]*\]", "", no_strings)
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", no_ranges))
    return {t for t in tokens if t not in PROMQL_WORDS}


def test_every_query_names_an_exported_series():
    pytest.importorskip("vllm")
    dash = json.loads((ROOT / "examples/grafana/kvsched.json").read_text())
    kvsched = exported_kvsched_names()
    checked = 0
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in series(target["expr"]):
                checked += 1
                if name.startswith("kvsched_"):
                    assert name in kvsched, f"{panel['title']}: {name} is not exported by kvsched"
                elif name.startswith("vllm:"):
                    base = re.sub(r"_(bucket|sum|count|total)$", "", name)
                    assert source_defines("vllm", base), f"{panel['title']}: vLLM defines no {base}"
                elif name.startswith("ray_serve_"):
                    base = re.sub(r"_total$", "", name.removeprefix("ray_"))
                    assert source_defines("ray", base), f"{panel['title']}: Ray Serve exports no {name}"
                else:
                    raise AssertionError(f"{panel['title']}: {name} is not a kvsched, vLLM or Ray Serve series")
    assert checked >= 20
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("pin", "releases by reason", "tier", "compaction", "router"):
        assert topic in titles


def test_the_check_catches_a_misspelt_series():
    assert "kvsched_pinned_blockz" not in exported_kvsched_names()
    assert series('sum by (reason) (rate(kvsched_x_total{reason="a"}[5m]))') == {"kvsched_x_total"}


def test_every_level_and_store_statistic_is_exported():
    """Found by review: counters added to the shared store and compaction checkpoints (bad values, error replies,
    failed puts) were kept but never reached /metrics. The names are read off the code that produces them."""
    import ast

    from kvsched.adapters.store.redis_store import RedisStore
    from kvsched.adapters.vllm import compaction_metrics, metrics

    exported = set(metrics.GAUGES) | set(metrics.COUNTERS)
    assert set(RedisStore("redis://127.0.0.1:9/0").stats()) <= exported
    source = (ROOT / "kvsched/adapters/vllm/tier_levels.py").read_text()
    stats_fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "stats")
    produced = {kw.arg for n in ast.walk(stats_fn) if isinstance(n, ast.Call) for kw in n.keywords if kw.arg}
    assert len(produced) > 10 and not produced - exported, sorted(produced - exported)
    shared = (ROOT / "kvsched/adapters/vllm/compaction_shared.py").read_text()
    counted = set(re.findall(r'counters\["(\w+)"\]', shared))
    assert counted and not counted - set(compaction_metrics.COUNTERS), sorted(counted - set(compaction_metrics.COUNTERS))
