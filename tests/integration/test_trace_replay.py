"""`kvsched bench replay`'s prompts on a real `vllm serve`: the engine's prefix cache hits exactly the blocks a trace
says requests share, no more (a turn's output-completed block is the model's, not the trace's) and no fewer."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

from kvsched.bench.trace_engine import drive, measured  # noqa: E402
from kvsched.bench.trace_prompts import plan  # noqa: E402
from kvsched.sim.trace import Trace, TraceRequest  # noqa: E402
from tests.integration.conftest import ready  # noqa: E402

pytestmark = pytest.mark.integration
BS = 512


def test_the_engine_hits_the_blocks_the_trace_shares(launched):
    server = ready(launched, "replay")
    reqs = [TraceRequest(t=0.0, session="s1", prompt_tokens=2 * BS + BS // 2, output_tokens=BS, blocks=["a", "b", "c"]),
            TraceRequest(t=0.5, session="s2", prompt_tokens=2 * BS, output_tokens=64, blocks=["a", "x"]),
            TraceRequest(t=1.5, session="s1", prompt_tokens=5 * BS, output_tokens=64, blocks=["d", "e"], reuse=3),
            TraceRequest(t=2.0, session="s3", prompt_tokens=3 * BS, output_tokens=64, blocks=["y", "z", "w"])]
    p = plan(Trace.from_requests(BS, reqs), 32, 2048)
    before = server.metrics()
    outcomes, _, _ = drive(server.url, p.requests)
    m = measured(outcomes, before, server.metrics(), 1.0, 0.0)
    assert m["errors"] == 0, m["first_errors"]
    assert m["prompt_tokens_total"] == sum(len(r.prompt) for r in p.requests) == 80 + 64 + 160 + 96
    # s2 hits block "a" (32 tokens); s1's second turn hits "a" and "b" (64), not "c": its first turn's output
    # completed that block with the model's tokens; s3 shares nothing
    assert m["prefix_hit_tokens"] == 96
    assert m["prefill_tokens_computed"] == 400 - 96
