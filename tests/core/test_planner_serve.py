"""`kvsched plan`'s serving advice (found by review): the kvsched levers change the KV cache only, the weight dtype
and the `vllm serve` flags agree, and every pool must fit a GPU. Expected figures are worked by hand."""

from __future__ import annotations

import json
import math

import pytest

from kvsched.cli import main
from kvsched.core.planner import GIB, ModelShape
from kvsched.core.planner_fleet import Workload, plan

# Llama 3.1 8B in FP8: its linear layers at 1 byte, the embeddings, the untied lm_head and 65 norms (2 a layer + the
# final one) at 2 bytes: 8.03e9 x 1 + (2 x 128,256 x 4,096 + 65 x 4,096) x (2 - 1) bytes (test_planner_weights)
L8_FP8 = 8.03e9 + 2 * 128_256 * 4096 + 65 * 4096


def run_json(capsys, argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(("argv", "weights_bytes"), [
    ([], 8.03e9 * 2),  # a bf16 KV cache: bf16 weights, 2 bytes per parameter
    (["--weight-dtype", "bf16", "--kv-dtype", "fp8"], 8.03e9 * 2),
    (["--weight-dtype", "fp8"], L8_FP8),
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
    assert plan(l8, Workload(workflows=1), "fp8", "fp8_e4m3").weights_bytes == int(L8_FP8)
    assert plan(l8, Workload(workflows=1), "fp8", "float32").weights_bytes == int(8.03e9 * 4)  # asked for: kept


@pytest.mark.parametrize(("argv", "flag", "weights_bytes"), [
    (["--kv-dtype", "fp8"], None, 8.03e9 * 2),  # the FP8 KV cache alone: bf16 weights, nothing to quantize
    (["--kv-dtype", "fp8", "--weight-dtype", "fp8"], "--quantization fp8", L8_FP8),
    (["--weight-dtype", "fp16"], "--dtype float16", 8.03e9 * 2),
])
def test_the_serve_flags_serve_the_planned_weights(capsys, argv, flag, weights_bytes):
    out = run_json(capsys, ["--preset", "llama-3.1-8b", *argv])
    assert out["plan"]["weights_bytes"] == int(weights_bytes)
    assert (flag in out["vllm_args"]) if flag else ("--quantization" not in out["vllm_args"])
    if flag == "--quantization fp8":
        assert any("pre-quantized FP8 checkpoint needs none" in n for n in out["vllm_notes"])


CT8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
       "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float"}, "targets": ["Linear"]}}}
BASE = {"num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 256, "num_parameters": 1e9}
NORMS = (2 * 2 + 1) * 256  # BASE's norms stay in 16 bits beside quantized weights (no vocab_size: no embeddings)
AWQ4 = 0.5 + (2 + 0.5) / 128  # 4 bits + a 16-bit scale and a 4-bit zero per group of 128


def base_bytes(bytes_per_param):
    """BASE's weight bytes: all of them at a 16-bit width; quantized, all but the norms."""
    return 1e9 * bytes_per_param if bytes_per_param >= 2 else (1e9 - NORMS) * bytes_per_param + NORMS * 2


@pytest.mark.parametrize(("extra", "dtype", "bytes_per_param"), [
    ({"torch_dtype": "float16"}, "fp16", 2),
    ({"dtype": "float32"}, "bf16", 2),  # vLLM's --dtype auto serves a float32 checkpoint in 16 bits
    ({"quantization_config": {"quant_method": "fp8"}, "torch_dtype": "bfloat16"}, "fp8", 1),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "int4", AWQ4),  # AWQ's default group_size 128
    ({}, "bf16", 2),
    # found by review: common FP8 checkpoints were refused (Llama 3.1 405B FP8 is fbgemm_fp8; llm-compressor's are
    # compressed-tensors, weights read from config_groups as vLLM's CompressedTensorsConfig reads them)
    ({"quantization_config": {"quant_method": "fbgemm_fp8", "modules_to_not_convert": []}}, "fp8",
     1 + 4 / 256),  # a float32 scale per output row of 256 weights
    ({"quantization_config": CT8}, "fp8", 1),
    ({"quantization_config": {**CT8, "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}}}},
     "int8", 1),
    ({"quantization_config": {**CT8, "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}},
     "int4", 0.5),
    ({"quantization_config": {**CT8, "config_groups": {"a": {"weights": {"num_bits": 4, "type": "int"}},
                                                       "b": {"weights": {"num_bits": 8, "type": "int"}}}}},
     "int8", 1),  # groups that differ: the heaviest, not an under-estimate
])
def test_a_configs_weights_are_its_checkpoints(capsys, tmp_path, extra, dtype, bytes_per_param):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **extra}))
    out = run_json(capsys, ["--model", str(tmp_path), "--kv-dtype", "fp8"])
    assert out["plan"]["weight_dtype"] == dtype
    assert out["plan"]["weights_bytes"] == pytest.approx(base_bytes(bytes_per_param), abs=1)
    assert "--quantization" not in out["vllm_args"] and "--dtype" not in out["vllm_args"]  # served as it is


@pytest.mark.parametrize("quant", [{"quant_method": "bitsandbytes"},
                                   {**CT8, "config_groups": {"g": {"weights": {"num_bits": 2, "type": "int"}}}},
                                   {"quant_method": "compressed-tensors"}])
def test_a_quantization_the_planner_cannot_read_needs_the_weight_dtype(capsys, tmp_path, quant):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "quantization_config": quant}))
    assert main(["plan", "--model", str(tmp_path)]) == 2
    assert "--weight-dtype" in capsys.readouterr().err
    out = run_json(capsys, ["--model", str(tmp_path), "--weight-dtype", "int4"])
    # a layout the config does not say: GPTQ/AWQ's default group of 128, with a 16-bit scale and a 4-bit zero each
    assert out["plan"]["weights_bytes"] == pytest.approx(base_bytes(AWQ4), abs=1)
    assert "--quantization" not in out["vllm_args"]


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


def test_the_cost_block_scales_the_8b_rate_to_the_model_and_counts_whole_replicas(capsys):
    """The catalogue's H100 SXM figure (22,000 interactions/h, $2.40/h) is for an 8B-class model (Llama 3.1 8B, 8.03e9
    parameters) on one GPU. A replica of tp GPUs reads its weights tp times as fast; a 70.6e9-parameter model reads
    70.6 / 8.03 times as many weights per token."""
    out = run_json(capsys, ["--preset", "llama-3.1-70b", "--sessions", "100", "--interactions-per-hour", "50000"])
    c, tp = out["cost"], out["cost"]["tensor_parallel"]
    assert tp == next(f["tensor_parallel"] for f in out["plan"]["fits"] if f["gpu"] == "H100-SXM5-80GB")
    rate = 22_000 * tp * 8.03e9 / 70.6e9
    assert c["replica_interactions_per_hour"] == pytest.approx(rate)
    assert c["gpu_prorated_per_hour"] == pytest.approx(50_000 * 2.40 * tp / rate)
    assert c["gpu_dedicated_per_hour"] == pytest.approx(math.ceil(50_000 / rate) * tp * 2.40)  # whole replicas
    assert c["breakeven_interactions_per_hour"] == pytest.approx(2.40 * tp / (0.40 * 950 / 1e6))
    assert out["fleet_cost"]["gpus"] >= math.ceil(50_000 / rate) * tp
    # the guide's 8B FP8 on one GPU keeps the catalogue's figure ($0.055/h prorated at 500 interactions/h)
    c8 = run_json(capsys, ["--preset", "llama-3.1-8b", "--kv-dtype", "fp8", "--weight-dtype", "fp8"])["cost"]
    assert (c8["tensor_parallel"], c8["replica_interactions_per_hour"]) == (1, 22_000)
    assert c8["gpu_prorated_per_hour"] == pytest.approx(500 * 2.40 / 22_000)


def test_a_moe_model_is_rated_by_its_active_parameters(capsys, tmp_path):
    """Mixtral 8x7B's shape: 8 experts, 2 routed per token. Parameters by hand (embeddings in and out, attention
    q/o + k/v, gated MLP of 3 matrices per expert): 46.7e9 in all, 12.9e9 read per token."""
    cfg = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14_336, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32_000}
    emb, attn = 32_000 * 4096 * 2, 4096 * 32 * 128 * 2 + 4096 * 8 * 128 * 2
    total, active = emb + 32 * (attn + 3 * 4096 * 14_336 * 8), emb + 32 * (attn + 3 * 4096 * 14_336 * 2)
    assert (round(total / 1e9, 1), round(active / 1e9, 1)) == (46.7, 12.9)
    s = ModelShape.from_hf_config(cfg)
    assert s.params == total and s.params_per_token == pytest.approx(active)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    argv = ["--model", str(tmp_path), "--kv-dtype", "fp8", "--weight-dtype", "fp8"]
    c = run_json(capsys, [*argv, "--sessions", "1"])["cost"]  # one sequence: the active parameters
    assert c["replica_interactions_per_hour"] == pytest.approx(22_000 * c["tensor_parallel"] * 8.03e9 / active)
    # Found by review: a batch of B sequences reads the union of their experts, 1 - (1 - 2/8)^B of each layer's. Four
    # sessions (0.5 GiB of FP8 KV each beside 43.5 GiB of weights) share one H100 replica: B = 4, share 175/256.
    c = run_json(capsys, [*argv, "--sessions", "4"])["cost"]
    assert (c["tensor_parallel"], c["decode_batch"]) == (1, 4) and 1 - 0.75**4 == 175 / 256
    step = emb + 32 * attn + 32 * 3 * 4096 * 14_336 * 8 * 175 / 256
    assert c["params_per_step"] == pytest.approx(step) and c["params_per_token"] == pytest.approx(active)
    assert c["replica_interactions_per_hour"] == pytest.approx(22_000 * 8.03e9 / step)
    assert "a step of 4 sequences reads ~68% of them" in c["throughput_basis"]
    many = run_json(capsys, [*argv, "--sessions", "30"])["cost"]  # 30 sequences: all but 0.018% of the experts
    routed = 32 * 3 * 4096 * 14_336 * 8
    assert many["decode_batch"] == 30 and many["params_per_step"] == pytest.approx(total - routed * 0.75**30)


def test_a_cost_gpu_that_cannot_hold_the_model_is_an_error(capsys, tmp_path):
    catalogue = tmp_path / "gpus.toml"
    catalogue.write_text('[[gpu]]\nname = "big"\nvram_gib = 80\nprice_per_hour = 2.0\n'
                         '[[gpu]]\nname = "small"\nvram_gib = 8\nprice_per_hour = 0.5\n')
    # 70.6e9 bf16 weights are 131.5 GiB: 8 small GPUs plan 8 x 8 x 0.9 / 1.15 = 50.1 GiB, 4 big ones 250.4 GiB
    assert 8 * 8 * 0.9 / 1.15 < 70.6e9 * 2 / GIB < 4 * 80 * 0.9 / 1.15
    argv = ["plan", "--gpu-catalog", str(catalogue), "--preset", "llama-3.1-70b"]
    assert main([*argv, "--cost-gpu", "small"]) == 2
    assert "--cost-gpu small cannot hold a replica of llama-3.1-70b" in capsys.readouterr().err
    assert main([*argv, "--cost-gpu", "big"]) == 0


def test_the_default_cost_gpu_that_cannot_hold_the_model_leaves_the_cost_out(capsys, tmp_path):
    """Found by review: Llama 3.1 405B bf16 fits H200s and B200s, but the default cost GPU (an 80 GB H100) cannot hold
    it, and `kvsched plan` printed only that error instead of its memory figures and GPU table."""
    catalogue = tmp_path / "gpus.toml"
    catalogue.write_text('[[gpu]]\nname = "H100-SXM5-80GB"\nvram_gib = 80\nprice_per_hour = 2.4\n'
                         '[[gpu]]\nname = "big"\nvram_gib = 192\nprice_per_hour = 6.0\n')
    # 405e9 bf16 weights are 754.4 GiB: 8 H100s plan 8 x 80 x 0.9 / 1.15 = 500.9 GiB, 8 big ones 1,202 GiB
    assert 8 * 80 * 0.9 / 1.15 < 405e9 * 2 / GIB < 8 * 192 * 0.9 / 1.15
    cfg = {"hidden_size": 16384, "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
           "intermediate_size": 53248, "vocab_size": 128256, "num_parameters": 405e9}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    argv = ["--gpu-catalog", str(catalogue), "--model", str(tmp_path), "--sessions", "4"]
    out = run_json(capsys, argv)
    assert [f["gpu"] for f in out["plan"]["fits"]] == ["big"] and out["plan"]["weights_bytes"] == 810e9
    assert out["cost"] is None and out["fleet_cost"] is None and out["vllm_args"] is None
    assert "H100-SXM5-80GB cannot hold a replica" in out["cost_note"] and out["cost_note"].endswith("can: big")
    assert main(["plan", *argv]) == 0
    text = capsys.readouterr().out
    assert "| big " in text and "note: no cost or fleet figures" in text and "cost on" not in text
    assert main(["plan", *argv, "--cost-gpu", "H100-SXM5-80GB"]) == 2  # named by the user: still refused
    assert "--cost-gpu H100-SXM5-80GB cannot hold a replica" in capsys.readouterr().err
    assert run_json(capsys, [*argv, "--cost-gpu", "big"])["cost"]["tensor_parallel"] == 8
