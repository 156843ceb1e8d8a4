"""kvsched with vLLM's FP8 KV cache (`--kv-cache-dtype fp8`, CPU backend: AVX-512, head_dim 64, block size 32)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fp8_server(fp8_kv_server):
    """Started with the package's other shared servers (conftest.launched; spec in servers.py). It runs kvsched's FP8
    tier too (test_fp8_tier's tier over an fp8 cache uses it): the pins and byte costs checked here are the pool's."""
    return fp8_kv_server


def _sessions(server):
    import urllib.request

    with urllib.request.urlopen(server.base + "/kvsched/sessions", timeout=30) as r:
        body = json.loads(r.read())
    return {row["session_id"]: row for row in body["sessions"]}, body["stats"]


def test_byte_costs_follow_the_fp8_cache_dtype(fp8_server, tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    expected = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 1  # one byte per fp8 element
    _, stats = _sessions(fp8_server)
    assert stats["kv_bytes_per_token"] == expected
    assert fp8_server.metrics()["kvsched_kv_bytes_per_token"] == expected


def test_retained_fp8_prefix_survives_a_flood_and_is_hit(fp8_server):
    client = openai.OpenAI(base_url=fp8_server.url, api_key="none", max_retries=0, timeout=60)

    def chat(messages, session=None):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                              extra_headers={"X-Session-Id": session} if session else None)

    history = [{"role": "system", "content": "You are a careful agent. " * 10},
               {"role": "user", "content": "read page 1 " * 40}]
    first = chat(history, session="fp8-worker")
    before = fp8_server.metrics()
    for i in range(4):  # each fills over a quarter of the 48-block pool
        chat([{"role": "user", "content": f"search result {i} " * 150}])
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "tool output " * 20}]
    chat(history, session="fp8-worker")
    after = fp8_server.metrics()
    saved = after["kvsched_retained_hit_tokens_total"] - before["kvsched_retained_hit_tokens_total"]
    assert saved >= first.usage.prompt_tokens - 32
    rows, stats = _sessions(fp8_server)
    assert rows["fp8-worker"]["hits"] >= 1 and stats["free_blocks"] + stats["pinned_blocks"] <= stats["total_blocks"]


def test_an_fp8_cache_on_a_cpu_that_cannot_hold_one_fails_at_start_in_one_line(failed_starts):
    """On a CPU without AVX-512/AMX (skipped elsewhere: tests/adapters/vllm/test_compat.py covers the rule there). Run
    with the package's other start-ups that must fail (conftest.failed_starts; command in servers.py)."""
    from kvsched.ops.cpu_features import cpu_features

    reason = cpu_features().fp8_kv_cache_refusal()
    if reason is None:
        pytest.skip("this CPU can hold an fp8 KV cache (AVX-512 or AMX), so nothing is refused")
    proc = failed_starts["fp8_kv:refused"]
    assert proc.returncode == 2
    assert f"kvsched: {reason}" in proc.stderr.splitlines()
