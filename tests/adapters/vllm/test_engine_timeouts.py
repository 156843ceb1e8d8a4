"""A stuck or slow engine core must not hang the API server's kvsched routes (found by review: `/metrics` awaited the
scheduler's stats with no timeout, so a stopped EngineCore hung every scrape, vLLM's own metrics with it)."""

import asyncio
from types import SimpleNamespace

from kvsched.adapters.vllm import admin_routes, middleware
from kvsched.adapters.vllm.middleware import KVSchedMiddleware

VLLM_BODY = b"# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0.0\n"


class Engine:
    """vLLM's API server with an engine core that answers the scheduler's utility calls, or never (`stuck`)."""

    def __init__(self, stuck: bool) -> None:
        self.stuck = stuck
        self.calls: list[str] = []

        async def call_utility_async(name, op, *args):
            self.calls.append(op)
            if self.stuck:
                await asyncio.Event().wait()
            return {"pinned_blocks": 7, "sessions_seen": 3}

        self.state = SimpleNamespace(args=SimpleNamespace(scheduler_cls="kvsched.adapters.vllm.scheduler.X",
                                                          api_key=[]),
                                     engine_client=SimpleNamespace(engine_core=SimpleNamespace(
                                         call_utility_async=call_utility_async)))

    async def __call__(self, scope, receive, send):  # vLLM's /metrics handler
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain; version=0.0.4"),
                                (b"content-length", str(len(VLLM_BODY)).encode())]})
        await send({"type": "http.response.body", "body": VLLM_BODY})


async def request(mw, app, method, path):
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "app": app,
             "headers": []}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(m):
        sent.append(m)

    await asyncio.wait_for(mw(scope, receive, send), 10)  # a hang fails the test instead of stalling the suite
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def scrapes(stuck: bool, n: int):
    app = Engine(stuck)
    mw = KVSchedMiddleware(app)

    async def run():
        return [await request(mw, app, "GET", "/metrics") for _ in range(n)]

    return app, asyncio.run(run())


def test_a_stuck_engine_core_gives_vllms_metrics_and_stats_up_0(monkeypatch):
    monkeypatch.setattr(middleware, "STATS_TIMEOUT_S", 0.05)
    app, answers = scrapes(stuck=True, n=3)
    for status, body in answers:
        text = body.decode()
        assert status == 200 and text.startswith(VLLM_BODY.decode())
        assert "kvsched_stats_up 0.0" in text and "kvsched_rejected_requests_total 0.0" in text
        assert "kvsched_pinned_blocks" not in text  # no engine series at all: a counter at 0 would read as a reset
    assert app.calls == ["stats"]  # one call in flight, not one more per scrape


def test_an_answering_engine_core_gives_its_stats_and_stats_up_1():
    app, answers = scrapes(stuck=False, n=2)
    for status, body in answers:
        assert status == 200 and b"kvsched_stats_up 1.0" in body and b"kvsched_pinned_blocks 7.0" in body
    assert app.calls == ["stats", "stats"]  # a finished call is not reused: every scrape reads fresh stats


def test_session_routes_answer_503_when_the_engine_core_does_not(monkeypatch):
    monkeypatch.setattr(admin_routes, "ENGINE_TIMEOUT_S", 0.05)
    app = Engine(stuck=True)
    mw = KVSchedMiddleware(app)
    for method, path in (("GET", "/kvsched/sessions"), ("DELETE", "/kvsched/sessions/s"),
                         ("DELETE", "/kvsched/sessions")):
        status, body = asyncio.run(request(mw, app, method, path))
        assert status == 503 and b"did not answer within" in body
