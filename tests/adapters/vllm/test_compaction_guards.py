"""Compaction on the API server against requests it must not be fooled or stalled by (found by review): a session
ended while its summary is made, a prefixed URL under `--root-path`, a message far larger than the model's context."""

import asyncio

from kvsched.core.compaction_config import Strategy
from tests.adapters.vllm.test_compaction import SCOPE, FakeVllm, compactor, request, run


class Shared:
    """Records the writes to the shared store (the interface of `SharedCheckpoints`); holds nothing to load."""

    def __init__(self):
        self.writes = []
        self.counters = {}

    async def load_into(self, local, session):
        return 0

    def save(self, local, session):
        self.writes.append(("save", len(local.checkpoints(session))))

    def forget(self, session):
        self.writes.append(("forget",))


def test_a_summary_landing_after_its_session_ended_is_neither_stored_nor_saved():
    """The end flag arrives while the session's summary call runs: when the summary lands it was stored again (in a
    re-created session, and in the shared store), and the id's next request was served with the ended one's summary."""
    app = FakeVllm("slow")
    comp = compactor(app)
    comp.shared = shared = Shared()

    async def scenario():
        await comp.prepare(SCOPE, request(8), {})  # starts the background summary
        await asyncio.sleep(0)
        end = request(8)
        end["vllm_xargs"]["session_end"] = 1
        await comp.prepare(SCOPE, end, {})
        app.release.set()
        await asyncio.gather(*comp.tasks.values())
        writes = list(shared.writes)
        return writes, await comp.prepare(SCOPE, request(9), {})

    writes, later = run(scenario())
    assert writes == [("forget",)] and comp.stats()["summaries_dropped"] == 1
    assert later.replaced == 0  # a new session under the id starts from nothing


def test_a_prefixed_url_under_root_path_is_compacted_and_capped_like_the_plain_one():
    """Under `--root-path /api` a chat request may arrive as /api/v1/chat/completions (vLLM routes it with the prefix
    removed): compaction compared the raw path, so the prefixed URL escaped it, even the operator's cap."""
    prefixed = dict(SCOPE, path="/api/v1/chat/completions", root_path="/api")
    capped = compactor(FakeVllm(), strategy=Strategy.CAP, cap_tokens=10)
    assert run(capped.prepare(SCOPE, request(8), {})).status == 400
    assert run(capped.prepare(prefixed, request(8), {})).status == 400
    payload = request(8)
    assert run(compactor(FakeVllm(), wait_for_summary=True).prepare(prefixed, payload, {})).replaced > 0
    elsewhere = dict(SCOPE, path="/api/v1/completions", root_path="/api")
    assert run(capped.prepare(elsewhere, request(8), {})).status == 200  # only chat is compacted
