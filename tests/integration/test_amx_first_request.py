"""A fresh `vllm serve --scheduler kvsched` of the tiny model survives a first prompt of at most 4 tokens on an AMX CPU.

Found by review: it died there with SIGILL (exit code -4; the engine core with the worker inside it, or the worker
process of vLLM's own layout), whatever the ulimit or streaming: vLLM 0.32's CPU attention runs AMX tiles without
asking Linux for them, and with every linear weight of the model at most 1 MiB no kernel had asked before a 5-token
batch (kvsched.ops.cpu_features.request_amx_tiles; the plugin now asks in every process). The condition is the
engine's very first batch: the package's shared hardened server (conftest.secure_server, the same engine: kvsched, 1024
tokens, 48 blocks, the suite's worker layout) while it has served nothing (this module runs first in the package: a
start-up saved), else a server of its own."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kvsched.ops.cpu_features import cpu_features
from tests.integration.secure import KEYS
from tests.vllm_layout import worker

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not cpu_features().amx, reason="needs an AMX CPU (vLLM's 'amx' attention ISA)")]


def complete(server, prompt: str) -> dict:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4, "ignore_eos": True}).encode()
    key = {"Authorization": f"Bearer {KEYS[0]}"} if "--api-key" in server.spec.extra_args else {}
    request = urllib.request.Request(server.url + "/completions", data=body,
                                     headers={"Content-Type": "application/json", **key})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


@pytest.fixture
def fresh_server(tiny_model_dir, secure_server):
    """A `vllm serve --scheduler kvsched` of the tiny model whose engine has run no batch yet."""
    from kvsched.serving import ServerSpec, VllmServer

    if secure_server.metrics().get("vllm:prompt_tokens_total", 0.0) == 0:
        yield secure_server
        return
    with VllmServer(ServerSpec(model=tiny_model_dir, scheduler="kvsched", max_model_len=1024, num_blocks=48,
                               worker=worker())) as server:
        yield server


def test_a_first_prompt_of_four_tokens_is_served(fresh_server) -> None:
    server = fresh_server
    assert server.spec.scheduler == "kvsched" and server.spec.serve_dtype() == "bfloat16"  # vLLM's "amx" attention
    assert server.metrics().get("vllm:prompt_tokens_total", 0.0) == 0  # its engine's first batch is this test's
    first = complete(server, "hello")
    assert first["usage"]["prompt_tokens"] <= 4  # the batch that no AMX-asking kernel ran before
    assert first["usage"]["completion_tokens"] == 4
    assert complete(server, "hello again")["usage"]["completion_tokens"] == 4
    assert server.proc is not None and server.proc.poll() is None
