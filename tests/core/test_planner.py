"""The planner against the sizing guide's worked figures, and its handling of GQA, MLA, sliding windows and bad input."""

from __future__ import annotations

import json

import pytest

from kvsched.core.gpu_catalog import load_catalog
from kvsched.core.planner import (
    GIB,
    Gpu,
    Levers,
    ModelShape,
    PlanError,
    Topology,
    Workload,
    cost,
    kv_bytes_for_context,
    kv_bytes_per_token,
    kv_capacity_tokens,
    plan,
    with_levers,
)

L8, L70 = ModelShape.from_preset("llama-3.1-8b"), ModelShape.from_preset("llama-3.1-70b")


def test_llama_8b_fp8_guide_figures():
    assert kv_bytes_per_token(L8, "fp8") == 65_536
    assert kv_bytes_for_context(L8, "fp8", 8192) == 512 * 2**20
    assert kv_bytes_for_context(L8, "fp8", 32_768) == 2 * GIB
    p = plan(L8, Workload(workflows=100, context=32_768), "fp8")
    assert p.kv_total_bytes == 200 * GIB
    assert kv_bytes_per_token(L8, "fp16") == 2 * 65_536  # FP16 doubles all of it


def test_guide_table_rows():
    p = plan(L8, Workload(workflows=100, context=8192), "fp8", overhead=0.0)
    assert p.kv_total_bytes / GIB == pytest.approx(50)
    assert p.weights_bytes / 1e9 == pytest.approx(8, rel=0.05)
    assert (p.kv_total_bytes + p.weights_bytes) / 1e9 == pytest.approx(60, rel=0.05)
    p70 = plan(L70, Workload(workflows=50, context=8192), "fp8", overhead=0.15)
    assert p70.kv_total_bytes / 1e9 == pytest.approx(64, rel=0.06)
    assert p70.weights_bytes / 1e9 == pytest.approx(70, rel=0.02)
    assert p70.total_bytes / 1e9 == pytest.approx(158, rel=0.03)


def test_cost_crossover_examples():
    c = cost(950, 500, 0.40, 2.40, 22_000)
    assert c.api_per_hour == pytest.approx(0.19) and c.gpu_prorated_per_hour == pytest.approx(0.055, abs=5e-4)
    assert c.gpu_wins and c.api_per_1k_interactions == pytest.approx(0.38)
    assert c.gpu_per_1k_interactions == pytest.approx(0.11, abs=0.002)  # the production H100 figure
    assert 0.25 < c.breakeven_utilisation < 0.35  # "fixed GPUs win above roughly 30% utilisation"
    c100 = cost(950, 100, 0.40, 2.40, 22_000)
    assert c100.api_per_hour == pytest.approx(0.038) and c100.gpu_prorated_per_hour == pytest.approx(0.011, abs=5e-4)
    assert not cost(950, 500, 0.01, 2.40, 22_000).gpu_wins  # a cheap enough API wins per interaction


def test_topologies_set_the_live_slots():
    assert Workload(workflows=100, topology=Topology.FLAT, agents=5).kv_slots == 500
    assert Workload(workflows=100, topology=Topology.HIERARCHICAL, agents=4).kv_slots == 500
    assert Workload(workflows=100, topology=Topology.PIPELINE, agents=5).kv_slots == 100  # one active stage each
    w = Workload(workflows=1, context=2000, tool_calls=5, tool_tokens=500)
    assert w.session_tokens == 4500  # every tool result stays in the KV cache


def test_mla_and_sliding_window_are_not_the_plain_formula():
    mla = ModelShape.from_preset("deepseek-v2-lite")
    assert kv_bytes_per_token(mla, "bf16") == 27 * (512 + 64) * 2  # latent + rope key, no x2, no heads
    sw = ModelShape.from_preset("mistral-7b-v0.1")
    assert kv_bytes_for_context(sw, "fp16", 32_768) == kv_bytes_for_context(sw, "fp16", 4096)  # capped at the window
    mixed = ModelShape.from_hf_config({"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
                                       "hidden_size": 512, "sliding_window": 1024,
                                       "layer_types": ["sliding_attention", "full_attention"] * 2})
    per_layer = 2 * 2 * 64 * 2
    assert kv_bytes_for_context(mixed, "bf16", 8192) == per_layer * (2 * 8192 + 2 * 1024)


def test_capacity_counts_whole_blocks():
    assert kv_capacity_tokens(L8, "fp8", GIB, block_size=16) == GIB // 65_536
    assert kv_capacity_tokens(L8, "fp8", GIB + 65_536 * 15, block_size=16) == GIB // 65_536  # a partial block is no use


def test_gpu_fits_choose_tensor_parallel_when_needed():
    p = plan(L70, Workload(workflows=50, context=8192), "fp16", gpus=[Gpu("H100", 80, 2.4)])
    (fit,) = p.fits
    assert fit.tensor_parallel >= 2  # 141 GB of fp16 weights cannot sit on one 80 GB GPU
    assert fit.sessions_per_replica * fit.replicas >= 50 and fit.gpus == fit.replicas * fit.tensor_parallel
    assert plan(L70, Workload(workflows=1), "fp16", gpus=[Gpu("tiny", 8, 1.0)]).fits == []


def test_compaction_lever_bounds_sessions():
    w = Workload(workflows=10, context=40_000)
    compacted = with_levers(w, Levers(compaction_trigger=5000, summary_tokens=500, recent_tokens=2000))
    assert compacted.session_tokens == 7500
    assert with_levers(w, Levers(compaction_trigger=0)) == w


def test_catalogue_loads_and_rejects_bad_files(tmp_path):
    names = {g.name for g in load_catalog()}
    assert {"A100-80GB-PCIe", "H100-PCIe-80GB", "H100-SXM5-80GB", "H200-SXM-141GB", "B200-192GB"} <= names
    bad = tmp_path / "gpus.toml"
    bad.write_text('[[gpu]]\nname = "x"\n')
    with pytest.raises(PlanError, match="vram_gib"):
        load_catalog(bad)


def test_bad_input_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="unknown preset"):
        ModelShape.from_preset("gpt-9")
    with pytest.raises(PlanError, match="positive"):
        Workload(workflows=-1)
    with pytest.raises(PlanError, match="unknown dtype"):
        kv_bytes_per_token(L8, "fp7")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    with pytest.raises(PlanError, match="lacks"):
        ModelShape.from_hf_config(tmp_path)
    with pytest.raises(PlanError, match="cannot read"):
        ModelShape.from_hf_config(tmp_path / "missing")


def test_cli_json_and_errors(capsys):
    from kvsched.cli import main

    assert main(["plan", "--preset", "llama-3.1-8b", "--kv-dtype", "fp8", "--context", "8192", "--sessions", "100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["bytes_per_token"] == 65_536 and out["plan"]["kv_total_bytes"] == 50 * GIB
    assert main(["plan", "--sessions", "-3"]) == 2
    assert "positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--preset", "gpt-9"])
    assert exc.value.code == 2


def test_cli_plot_writes_a_png(tmp_path, capsys):
    from kvsched.cli import main

    out = tmp_path / "plan.png"
    assert main(["plan", "--preset", "llama-3.1-8b", "--kv-dtype", "fp8", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_with_kvsched_levers(capsys):
    from kvsched.cli import main

    assert main(["plan", "--preset", "llama-3.1-8b", "--context", "32768", "--sessions", "50", "--with-kvsched",
                 "--pin-budget", "0.5", "--json"]) == 0
    k = json.loads(capsys.readouterr().out)["with_kvsched"]
    assert k["fp8_kv"]["kv_per_session_bytes"] * 2 == k["compaction"]["kv_per_session_bytes"] * 32768 // 7500
    fit = k["fp8_kv+compaction"]["fits"][0]
    assert fit["retained_idle_sessions_per_replica"] == fit["sessions_per_replica"] // 2
    assert main(["plan", "--with-kvsched", "--pin-budget", "2"]) == 2
