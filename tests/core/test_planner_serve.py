"""`kvsched plan`'s serving advice (found by review): the kvsched levers change the KV cache only, the weight dtype
and the `vllm serve` flags agree, and every pool must fit a GPU. Expected figures are worked by hand."""

from __future__ import annotations

import json

import pytest

from kvsched.cli import main
from kvsched.core.planner import GIB, ModelShape
from kvsched.core.planner_fleet import Workload, plan


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


def test_the_weights_default_to_the_checkpoints_dtype_whatever_the_kv_dtype():
    l8 = ModelShape.from_preset("llama-3.1-8b")
    for kv in ("fp16", "fp8"):
        p = plan(l8, Workload(workflows=1), kv)
        assert (p.weight_dtype, p.weights_bytes) == ("bf16", int(8.03e9 * 2)), kv
    assert plan(l8, Workload(workflows=1), "fp8", "fp8_e4m3").weights_bytes == int(8.03e9)


@pytest.mark.parametrize(("argv", "flag", "weights_bytes"), [
    (["--kv-dtype", "fp8"], None, 8.03e9 * 2),  # the FP8 KV cache alone: bf16 weights, nothing to quantize
    (["--kv-dtype", "fp8", "--weight-dtype", "fp8"], "--quantization fp8", 8.03e9),
    (["--weight-dtype", "fp16"], "--dtype float16", 8.03e9 * 2),
])
def test_the_serve_flags_serve_the_planned_weights(capsys, argv, flag, weights_bytes):
    out = run_json(capsys, ["--preset", "llama-3.1-8b", *argv])
    assert out["plan"]["weights_bytes"] == int(weights_bytes)
    assert (flag in out["vllm_args"]) if flag else ("--quantization" not in out["vllm_args"])
    if flag == "--quantization fp8":
        assert any("pre-quantized FP8 checkpoint needs none" in n for n in out["vllm_notes"])


BASE = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256, "num_parameters": 1e9}


@pytest.mark.parametrize(("extra", "dtype", "bytes_per_param"), [
    ({"torch_dtype": "float16"}, "fp16", 2),
    ({"dtype": "float32"}, "bf16", 2),  # vLLM's --dtype auto serves a float32 checkpoint in 16 bits
    ({"quantization_config": {"quant_method": "fp8"}, "torch_dtype": "bfloat16"}, "fp8", 1),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "int4", 0.5),
    ({}, "bf16", 2),
])
def test_a_configs_weights_are_its_checkpoints(capsys, tmp_path, extra, dtype, bytes_per_param):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **extra}))
    out = run_json(capsys, ["--model", str(tmp_path), "--kv-dtype", "fp8"])
    assert out["plan"]["weight_dtype"] == dtype and out["plan"]["weights_bytes"] == int(1e9 * bytes_per_param)
    assert "--quantization" not in out["vllm_args"] and "--dtype" not in out["vllm_args"]  # served as it is


def test_a_quantization_the_planner_cannot_read_needs_the_weight_dtype(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "quantization_config": {"quant_method": "bitsandbytes"}}))
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "--weight-dtype" in capsys.readouterr().err
    out = run_json(capsys, ["--model", str(tmp_path), "--weight-dtype", "int4"])
    assert out["plan"]["weights_bytes"] == int(1e9 * 0.5) and "--quantization" not in out["vllm_args"]


def test_an_orchestrator_pool_no_gpu_holds_is_an_error(capsys, tmp_path):
    """A 16 GiB GPU holds the 3B workers (6.4 GB of bf16 weights) but not the 70B orchestrator: its bf16 weights,
    70.6e9 x 2 B = 131.5 GiB, exceed even 8 GPUs planned at 90% with 15% overhead (8 x 16 x 0.9 / 1.15 = 100.2 GiB)."""
    assert 70.6e9 * 2 / GIB > 8 * 16 * 0.9 / 1.15
    catalogue = tmp_path / "gpus.toml"
    catalogue.write_text('[[gpu]]\nname = "g16"\nvram_gib = 16\nprice_per_hour = 1.0\n')
    argv = ["plan", "--gpu-catalog", str(catalogue), "--cost-gpu", "g16", "--preset", "llama-3.2-3b", "--sessions", "4",
            "--topology", "hierarchical", "--agents", "2"]
    assert main(argv) == 0  # the workers alone fit
    capsys.readouterr()
    assert main([*argv, "--orchestrator-preset", "llama-3.1-70b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched plan: error: no catalogue GPU fits the orchestrator pool (llama-3.1-70b)")
