"""One hardened `vllm serve --scheduler kvsched` shared by the security, zero-change-client and fuzz tests (each test
uses its own session ids, salts or keys, so they do not interfere): two API keys (two tenants), an admin key, the
operator's compaction (summarize, small trigger) and vLLM's Responses store (for previous_response_id)."""

from __future__ import annotations

import pytest

from tests.integration.secure import ENV, KEYS, ServerSpec, VllmServer


@pytest.fixture(scope="package")  # stopped when tests/integration ends: later packages get its memory back
def secure_server(tiny_model_dir):
    pytest.importorskip("vllm")
    spec = ServerSpec(model=tiny_model_dir, scheduler="kvsched", max_model_len=1024, num_blocks=48,
                      extra_args=["--api-key", *KEYS], env=ENV)
    with VllmServer(spec) as server:
        yield server
