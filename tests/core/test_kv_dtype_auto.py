"""`--kv-dtype auto`, vLLM's own default for --kv-cache-dtype (the model's dtype), as `kvsched plan` and `kvsched
simulate` read it: the model's 16-bit dtype (fp16 for a float16 checkpoint, else bf16), so an operator who copies
vLLM's flags gets the 16-bit pool vLLM would hold. Found by review (review68): both refused it as an unknown dtype."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsched.cli import main
from kvsched.core.planner import kv_cache_dtype

PLAN = ["plan", "--preset", "llama-3.1-8b", "--context", "8192", "--sessions", "100", "--json"]


def test_plan_sizes_auto_as_the_models_16_bit_cache(capsys) -> None:
    figures = {}
    for dtype in ("auto", "bf16", "fp8"):
        assert main([*PLAN, "--kv-dtype", dtype]) == 0
        out = json.loads(capsys.readouterr().out)
        figures[dtype] = (out["plan"]["kv_dtype"], out["plan"]["bytes_per_token"], out["vllm_args"])
    assert figures["auto"] == figures["bf16"]
    assert figures["auto"][1] == 2 * figures["fp8"][1]
    assert "--kv-cache-dtype" not in figures["auto"][2]  # vLLM's default needs no flag


@pytest.mark.parametrize("checkpoint, kv", [("fp16", "fp16"), ("float16", "fp16"), ("bf16", "bf16"),
                                            ("fp8", "bf16"), ("", "bf16")])
def test_auto_is_fp16_for_a_float16_checkpoint_else_bf16(checkpoint: str, kv: str) -> None:
    assert kv_cache_dtype(" AUTO ", checkpoint) == kv


def test_simulate_takes_auto_as_a_16_bit_cache(tmp_path: Path, capsys) -> None:
    sizes = {}
    for dtype in ("auto", "bf16"):
        out = tmp_path / f"{dtype}.json"
        assert main(["simulate", "--generate", "--quick", "--workflows", "1", "--no-progress", "--kv-gib", "16",
                     "--kv-dtype", dtype, "--out", str(out)]) == 0
        sizes[dtype] = json.loads(out.read_text())["config"]["kv_bytes_per_token"]
    capsys.readouterr()
    assert sizes["auto"] == sizes["bf16"]


def test_an_unknown_dtype_is_still_refused_naming_auto_among_the_choices(capsys) -> None:
    assert main([*PLAN, "--kv-dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "unknown dtype for vLLM's KV cache" in err and "auto" in err and err.count("\n") == 1, err
