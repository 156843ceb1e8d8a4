"""The API-server side of the session routes (admin_routes.py): calls to the engine core are bounded per API server and
identical reads share one; a page is one engine call, the stats in it. Found by review: every request was its own
engine call (a page two), each run on the engine-core thread before its next step, so a burst held decoding."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from kvsched.adapters.vllm import admin_routes
from kvsched.adapters.vllm.middleware import KVSchedMiddleware


class Engine:
    """vLLM's API server over an engine core whose utility calls wait for `gate` (None: answer at once)."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.calls: list[tuple[str, list]] = []
        self.in_flight = self.most_in_flight = 0

        async def call_utility_async(name, op, *args):
            self.calls.append((op, args[0]["kvsched_args"] if args else []))
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                if self.gate is not None:
                    await self.gate.wait()
            finally:
                self.in_flight -= 1
            if op == "list":
                page = {"sessions": [], "next_cursor": None, "total": 0}
                return {**page, "stats": {"pinned_blocks": 1}} if len(args[0]["kvsched_args"]) > 4 and \
                    args[0]["kvsched_args"][4] else page
            return {"ended": 1}

        self.state = SimpleNamespace(args=SimpleNamespace(scheduler_cls="kvsched.adapters.vllm.scheduler.X",
                                                          api_key=["k"]),
                                     engine_client=SimpleNamespace(engine_core=SimpleNamespace(
                                         call_utility_async=call_utility_async)))


async def request(mw, app, method, path):
    path, _, query = path.partition("?")
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": query.encode(),
             "app": app, "headers": [(b"authorization", b"Bearer k")]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(m):
        sent.append(m)

    await mw(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


def burst(requests: list[tuple[str, str]], release_after_s: float = 0.05):
    async def run():
        app = Engine(asyncio.Event())
        mw = KVSchedMiddleware(app)
        tasks = [asyncio.ensure_future(request(mw, app, m, p)) for m, p in requests]
        await asyncio.sleep(release_after_s)
        app.gate.set()
        return app, await asyncio.wait_for(asyncio.gather(*tasks), 10)

    return asyncio.run(run())


def test_a_burst_of_deletes_keeps_at_most_the_bound_in_flight():
    app, answers = burst([("DELETE", f"/kvsched/sessions/s{i}") for i in range(12)])
    assert [status for status, _ in answers] == [200] * 12 and len(app.calls) == 12  # each one applied
    assert app.most_in_flight == admin_routes.SESSION_CALLS_IN_FLIGHT


def test_identical_reads_pending_at_once_share_one_engine_call():
    app, answers = burst([("GET", "/kvsched/sessions?summary=1")] * 20 + [("GET", "/kvsched/sessions?limit=5")] * 20)
    assert [op for op, _ in app.calls] == ["list", "list"] and all(status == 200 for status, _ in answers)
    assert answers[0] == answers[19] and answers[20] == answers[39]


def test_a_page_is_one_engine_call_with_the_stats_in_it():
    app = Engine()
    mw = KVSchedMiddleware(app)
    status, body = asyncio.run(request(mw, app, "GET", "/kvsched/sessions?limit=5"))
    assert status == 200 and body["stats"] == {"pinned_blocks": 1}
    assert app.calls == [("list", [[False, app.calls[0][1][0][1], None, False], 5, None, False, True])]
    asyncio.run(request(mw, app, "GET", "/kvsched/sessions?summary=1"))
    assert app.calls[-1][1][3:] == [True, False]  # counts only: no stats asked


def test_calls_queued_behind_a_stuck_engine_answer_503_and_free_their_place(monkeypatch):
    monkeypatch.setattr(admin_routes, "ENGINE_TIMEOUT_S", 0.2)

    async def run():
        app = Engine(asyncio.Event())  # never set: stuck
        mw = KVSchedMiddleware(app)
        answers = await asyncio.gather(*(request(mw, app, "DELETE", f"/kvsched/sessions/s{i}") for i in range(6)))
        sent_while_stuck = len(app.calls)
        app.gate.set()
        after = await request(mw, app, "DELETE", "/kvsched/sessions/later")
        return answers, sent_while_stuck, after

    answers, sent, after = asyncio.run(run())
    assert [status for status, _ in answers] == [503] * 6
    assert sent == admin_routes.SESSION_CALLS_IN_FLIGHT  # the queued ones gave up without reaching the engine
    assert after[0] == 200  # nothing left holding a place
