"""`/metrics` through kvsched's middleware with prometheus_client's own ASGI app inside, as vLLM mounts it: the bodies
a scraper gets must parse, in either format, with kvsched's series in them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, make_asgi_app
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families as text_families

from kvsched.adapters.vllm.middleware import KVSchedMiddleware

OPENMETRICS = b"application/openmetrics-text; version=1.0.0; charset=utf-8"


class Vllm:
    """vLLM's API server: its /metrics is prometheus_client's ASGI app (which names its header `Content-Type`)."""

    def __init__(self) -> None:
        registry = CollectorRegistry()
        Counter("vllm:demo", "a vLLM counter", registry=registry).inc()
        self.prometheus = make_asgi_app(registry=registry)

        async def call_utility_async(name, op, *args):
            return {"pinned_blocks": 3, "sessions_seen": 4, "released_payback": 2}

        args = SimpleNamespace(scheduler_cls="kvsched.adapters.vllm.scheduler.X", api_key=[])
        engine_core = SimpleNamespace(call_utility_async=call_utility_async)
        self.state = SimpleNamespace(args=args, engine_client=SimpleNamespace(engine_core=engine_core))

    async def __call__(self, scope, receive, send):
        await self.prometheus(scope, receive, send)


def scrape(accept: bytes | None = None, query: bytes = b"") -> tuple[dict[bytes, bytes], str]:
    app = Vllm()
    mw = KVSchedMiddleware(app)
    headers = [(b"accept", accept)] if accept else []
    scope = {"type": "http", "method": "GET", "path": "/metrics", "root_path": "", "query_string": query, "app": app,
             "headers": headers}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {k.lower(): v for k, v in start["headers"]}, body.decode()


def test_an_openmetrics_scrape_of_prometheus_clients_app_parses_with_kvscheds_series():
    """Found by review: the splice read the inner response's header as `content-type` only; prometheus_client sends
    `Content-Type`, so OpenMetrics bodies got text-format kvsched lines (`_total` families) and failed to parse."""
    headers, body = scrape(OPENMETRICS)
    assert b"openmetrics" in headers[b"content-type"] and int(headers[b"content-length"]) == len(body.encode())
    assert body.endswith("# EOF\n") and body.count("# EOF") == 1
    families = {f.name: f for f in openmetrics_families(body)}  # raises on a malformed body
    assert families["kvsched_pinned_blocks"].samples[0].value == 3
    assert families["kvsched_sessions_seen"].samples[0].value == 4 and "vllm:demo" in families


def test_a_text_scrape_of_prometheus_clients_app_parses_with_kvscheds_series():
    headers, body = scrape()
    assert headers[b"content-type"].startswith(b"text/plain") and "# EOF" not in body
    samples = {s.name: s.value for f in text_families(body) for s in f.samples}
    assert samples["kvsched_pinned_blocks"] == 3 and samples["kvsched_sessions_seen_total"] == 4
    assert samples["vllm:demo_total"] == 1


def test_a_scrape_narrowed_by_name_narrows_kvscheds_series_too():
    """Found by review: `/metrics?name[]=...` narrowed vLLM's series, and kvsched appended all of its own."""
    _, body = scrape(query=b"name[]=kvsched_pinned_blocks&name[]=vllm:demo_total")
    samples = {s.name for f in text_families(body) for s in f.samples}
    assert samples == {"kvsched_pinned_blocks", "vllm:demo_total"}
    _, body = scrape(OPENMETRICS, query=b"name[]=kvsched_pin_releases_total")
    families = list(openmetrics_families(body))
    assert [f.name for f in families] == ["kvsched_pin_releases"] and body.endswith("# EOF\n")
    assert {s.labels["reason"]: s.value for s in families[0].samples}["payback"] == 2


def test_active_sessions_says_it_counts_idle_sessions_too():
    """Found by review: the name says active, the value is the whole session table (idle sessions included)."""
    _, body = scrape()
    [family] = [f for f in text_families(body) if f.name == "kvsched_active_sessions"]
    assert "idle" in family.documentation
