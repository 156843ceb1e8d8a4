"""`kvsched plan`'s serving advice (found by review): the kvsched levers change the KV cache only, the weight dtype
and the `vllm serve` flags agree, and every pool must fit a GPU. Expected figures are worked by hand."""

from __future__ import annotations

import json

import pytest

from kvsched.cli import main
from kvsched.core.planner import GIB


def run_json(capsys, argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("argv", "weights_bytes"), [
    ([], 8.03e9 * 2),  # a bf16 KV cache: bf16 weights, 2 bytes per parameter
    (["--weight-dtype", "bf16", "--kv-dtype", "fp8"], 8.03e9 * 2),
    (["--weight-dtype", "fp8"], 8.03e9 * 1),
])
def test_the_levers_leave_the_weights_alone(capsys, argv, weights_bytes):
    """The FP8 KV lever switches the KV cache to FP8, not the weights: they stay in the baseline's dtype."""
    out = run_json(capsys, ["--preset", "llama-3.1-8b", "--context", "32768", "--sessions", "50", "--with-kvsched",
                            *argv])
    assert out["plan"]["weights_bytes"] == int(weights_bytes)
    for lever in ("fp8_kv", "compaction", "fp8_kv+compaction"):
        assert out["with_kvsched"][lever]["weights_bytes"] == int(weights_bytes), lever
    # the lever halves a bf16 KV cache: 32 layers x 2 x 8 KV heads x 128 x 1 byte x 32K tokens = 2 GiB per session
    assert out["with_kvsched"]["fp8_kv"]["kv_per_session_bytes"] == 32 * 2 * 8 * 128 * 32_768 == 2 * GIB
