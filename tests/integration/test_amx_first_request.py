"""A fresh `vllm serve --scheduler kvsched` of the tiny model survives a first prompt of at most 4 tokens on an AMX CPU.

Found by review: it died there with SIGILL (exit code -4; the engine core with the worker inside it, or the worker
process of vLLM's own layout), whatever the ulimit or streaming: vLLM 0.32's CPU attention runs AMX tiles without
asking Linux for them, and with every linear weight of the model at most 1 MiB no kernel had asked before a 5-token
batch (kvsched.ops.cpu_features.request_amx_tiles; the plugin now asks in every process). Its own server: the
condition is the engine's very first batch."""

from __future__ import annotations

import json
import urllib.request

import pytest

from kvsched.ops.cpu_features import cpu_features
from tests.vllm_layout import worker

pytest.importorskip("vllm")
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not cpu_features().amx, reason="needs an AMX CPU (vLLM's 'amx' attention ISA)")]


def complete(server, prompt: str) -> dict:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 4, "ignore_eos": True}).encode()
    request = urllib.request.Request(server.url + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def test_a_first_prompt_of_four_tokens_is_served(tiny_model_dir) -> None:
    from kvsched.serving import ServerSpec, VllmServer

    spec = ServerSpec(model=tiny_model_dir, scheduler="kvsched", max_model_len=1024, num_blocks=48, worker=worker())
    assert spec.serve_dtype() == "bfloat16"  # the dtype of vLLM's "amx" attention
    with VllmServer(spec) as server:
        first = complete(server, "hello")
        assert first["usage"]["prompt_tokens"] <= 4  # the batch that no AMX-asking kernel ran before
        assert first["usage"]["completion_tokens"] == 4
        assert complete(server, "hello again")["usage"]["completion_tokens"] == 4
        assert server.proc is not None and server.proc.poll() is None
