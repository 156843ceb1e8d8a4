"""A real GPU `vllm serve --scheduler kvsched` (the GPU build of vLLM): a session released under pressure comes back
from the FP8 tier, on the device, and decodes as a recompute does."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")


def gpu_vllm() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


@pytest.fixture(scope="module")
def tier_server(tiny_model_dir):
    if not gpu_vllm():
        pytest.skip("the installed vLLM is not the CUDA build (pip install 'kvsched[gpu]')")
    from kvsched.serving import ServerSpec, VllmServer

    with VllmServer(ServerSpec(model=tiny_model_dir, scheduler="kvsched", max_model_len=1024, num_blocks=48,
                               block_size=16, extra_args=["--kvsched-fp8-tier-gb", "0.05"])) as server:
        yield server


def test_a_session_released_under_pressure_is_restored_on_the_gpu(tier_server):
    from tests.integration.test_fp8_tier import turn_after_flood

    first, second, before, after, _ = turn_after_flood(tier_server, "gpu")
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert after["kvsched_tier_enabled"] == 1 and d["kvsched_tier_restores_total"] >= 1
    assert d["kvsched_tier_load_failures_total"] == 0
    assert 0 < after["kvsched_tier_kv_rel_rms_error"] <= 0.07
