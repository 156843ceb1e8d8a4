"""Servers of this package that more than one module uses, or that start together (`servers.py`). The hardened
`vllm serve --scheduler kvsched` is shared by the security, zero-change-client and fuzz tests (each test uses its own
session ids, salts or keys, so they do not interfere): two API keys (two tenants), an admin key, the operator's
compaction (summarize, small trigger) and vLLM's Responses store (for previous_response_id)."""

from __future__ import annotations

import pytest

from tests.integration.servers import package_specs


@pytest.fixture(scope="package")
def secure_recording(tmp_path_factory):
    """The trace file the shared hardened server records its requests to."""
    return tmp_path_factory.mktemp("recording") / "secure.jsonl"


@pytest.fixture(scope="package")  # stopped when tests/integration ends: later packages get their memory back
def launched(tiny_model_dir, secure_recording):
    """The package's shared servers, spawned together when the first is needed (each fixture below waits for its
    own); a module's server is stopped when that module ends, the rest when the package does."""
    pytest.importorskip("vllm")
    from kvsched.serving import VllmServer

    servers = {name: VllmServer(spec) for name, spec in package_specs(tiny_model_dir, secure_recording).items()}
    try:
        for server in servers.values():
            server.launch()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def ready(launched, name):
    server = launched[name]
    try:
        return server.wait_ready()
    except BaseException:
        server.stop()
        raise


@pytest.fixture(scope="package")
def secure_server(launched):
    return ready(launched, "secure")


@pytest.fixture(scope="module")
def compaction_server(launched):
    server = ready(launched, "compaction")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fp8_kv_server(launched):
    from tests.cpu import require_fp8_kv_cache

    require_fp8_kv_cache()
    server = ready(launched, "fp8_kv")
    yield server
    server.stop()
