"""A real GPU `vllm serve --scheduler kvsched` (the GPU build of vLLM): a session released under pressure comes back
from the FP8 tier, on the device, and decodes as a recompute does; eager and with vLLM's CUDA graphs (its default
FULL_AND_PIECEWISE mode replays uniform decode batches as FULL graphs, which skip the connector's per-layer waits: the
tier's restores must be complete before the forward)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")


def gpu_vllm() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


# vLLM 0.32 runs Model Runner V2 by default on CUDA (vllm/config/vllm.py: use_v2_model_runner) and the V1 runner when
# asked (VLLM_USE_V2_MODEL_RUNNER=0) or when V2 lacks a feature the engine uses (some speculative decoding). They call
# the connector in another order: V1 stores and prefetches (handle_preemptions) before it updates its batch state,
# V2 after, just before the forward (found by review: only the default runner was served here).
RUNS = [(True, "1"), (False, "1"), (False, "0")]


@pytest.fixture(scope="module", params=RUNS, ids=["eager-runner-v2", "cuda-graphs-runner-v2", "cuda-graphs-runner-v1"])
def tier_server(tiny_model_dir, request):
    if not gpu_vllm():
        pytest.skip("the installed vLLM is not the CUDA build (pip install 'kvsched[gpu]')")
    from kvsched.serving import ServerSpec, VllmServer

    eager, runner_v2 = request.param
    with VllmServer(ServerSpec(model=tiny_model_dir, scheduler="kvsched", max_model_len=1024, num_blocks=48,
                               block_size=16, extra_args=["--kvsched-fp8-tier-gb", "0.05"],
                               env={"VLLM_USE_V2_MODEL_RUNNER": runner_v2}, enforce_eager=eager)) as server:
        yield server


def test_a_session_released_under_pressure_is_restored_on_the_gpu(tier_server):
    from tests.integration.test_fp8_tier import turn_after_flood

    first, second, before, after, _ = turn_after_flood(tier_server, "gpu")
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert after["kvsched_tier_enabled"] == 1 and d["kvsched_tier_restores_total"] >= 1
    assert d["kvsched_tier_load_failures_total"] == 0
    assert 0 < after["kvsched_tier_kv_rel_rms_error"] <= 0.07


def test_a_restored_turn_with_one_new_token_is_served_under_cuda_graphs(tier_server):
    """A turn whose whole prompt but its last token comes back from the tier: one token to compute, so it can join a
    uniform decode batch (a FULL CUDA graph on the cuda-graphs server) while its restore is in flight. The stream
    ordering itself is tested in test_tier_cuda; here the engine serves such a turn from the tier, whole."""
    from tests.integration.test_fp8_tier import chat, flood_until_released, pinned_blocks

    history = [{"role": "user", "content": "restore me " * 60}]
    first = chat(tier_server, history, session="one-token", max_tokens=4)
    assert pinned_blocks(tier_server, "one-token") > 0
    flood_until_released(tier_server, "one-token")
    before = tier_server.metrics()
    again = chat(tier_server, history, session="one-token", max_tokens=16)  # the same prompt: only its last token new
    after = tier_server.metrics()
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    restored = d["vllm:external_prefix_cache_hits_total"] + d["kvsched_tier_prefetch_hit_tokens_total"]
    assert restored >= (first.usage.prompt_tokens // 16) * 16 - 16, d
    assert d["kvsched_tier_load_failures_total"] == 0 and again.usage.completion_tokens == 16
    assert 0 < after["kvsched_tier_kv_rel_rms_error"] <= 0.07
