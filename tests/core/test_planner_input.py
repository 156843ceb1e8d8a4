"""`kvsched plan` on bad input: CLI numbers, config.json fields and GPU catalogues are one-line errors (exit 2)."""

from __future__ import annotations

import json

import pytest

from kvsched.cli import main
from kvsched.core.gpu_catalog import load_catalog
from kvsched.core.planner import ModelShape, PlanError
from kvsched.core.planner_cost import cost, fleet_cost

BASE = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 64}


def plan_fails(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched plan: error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--interactions-per-hour", "nan"], "--interactions-per-hour"),
    (["--interactions-per-hour", "inf"], "--interactions-per-hour"),
    (["--tokens-per-interaction", "nan"], "--tokens-per-interaction"),
    (["--api-price", "inf"], "--api-price"),
    (["--sessions", "1" + "0" * 300], "--sessions"),
    (["--context", "1" + "0" * 300], "--context"),
    (["--plot", "/proc/nonexistent/y.png"], "No such file"),
])
def test_bad_numbers_and_paths(capsys, argv, message):
    plan_fails(capsys, argv, message)


@pytest.mark.parametrize(("extra", "field"), [
    ({"text_config": 5}, "text_config"), ({"num_key_value_heads": "x"}, "num_key_value_heads"),
    ({"sliding_window": 16, "sliding_window_pattern": "x"}, "sliding_window_pattern"),
    ({"num_parameters": "abc"}, "num_parameters"), ({"head_dim": 1e400}, "head_dim"),
    ({"num_hidden_layers": 10**400}, "num_hidden_layers"),
])
def test_bad_config_fields_name_the_field(capsys, tmp_path, extra, field):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **extra}))
    with pytest.raises(PlanError, match=field):
        ModelShape.from_hf_config(tmp_path)
    plan_fails(capsys, ["--model", str(tmp_path)], field)


def test_a_null_text_config_is_no_text_config():
    assert ModelShape.from_hf_config({**BASE, "text_config": None}).layers == 2


@pytest.mark.parametrize(("text", "message"), [
    ('[[gpu]]\nname="g"\nvram_gib=nan\nprice_per_hour=1.0\n', "vram_gib"),
    ('[[gpu]]\nname="g"\nvram_gib=inf\nprice_per_hour=1.0\n', "vram_gib"),
    ('[[gpu]]\nname="g"\nvram_gib=80\nprice_per_hour=nan\n', "price_per_hour"),
    ('[[gpu]]\nname="g"\nvram_gib=80\nprice_per_hour=1\ninteractions_per_hour=inf\n', "interactions_per_hour"),
    ('[[gpu]]\nname="g"\nvram_gib=true\nprice_per_hour=1\n', "vram_gib"),
    ("gpu = 5\n", "must be a list of"),
    # found by review: 1e-310 raised OverflowError (a fleet of inf GPUs), 1e-300 planned 5e302 GPUs
    ('[[gpu]]\nname="g"\nvram_gib=80\nprice_per_hour=1\ninteractions_per_hour=1e-310\n', "interactions_per_hour"),
    ('[[gpu]]\nname="g"\nvram_gib=80\nprice_per_hour=1\n[[gpu]]\nname="g"\nvram_gib=40\nprice_per_hour=1\n',
     "listed twice"),
])
def test_bad_catalogues(capsys, tmp_path, text, message):
    path = tmp_path / "gpus.toml"
    path.write_text(text)
    with pytest.raises(PlanError, match=message):
        load_catalog(path)
    plan_fails(capsys, ["--gpu-catalog", str(path), "--cost-gpu", "g"], message)


def test_a_catalogue_that_is_not_utf8(capsys, tmp_path):
    path = tmp_path / "gpus.toml"
    path.write_bytes(b"\xff\xfe")
    plan_fails(capsys, ["--gpu-catalog", str(path)], "cannot read GPU catalogue")


def test_cost_refuses_non_finite_figures():
    with pytest.raises(PlanError):
        cost(950, float("nan"), 0.4, 2.4, 22_000)
    with pytest.raises(PlanError):
        cost(950, 500, float("inf"), 2.4, 22_000)


# Total memory nvidia-smi reports for each catalogue GPU, in MiB
NVIDIA_SMI_MIB = {"A100-80GB-PCIe": 81_920, "H100-PCIe-80GB": 81_559, "H100-SXM5-80GB": 81_559,
                  "H200-SXM-141GB": 143_771, "B200-192GB": 183_359, "RTX-5090-32GB": 32_607}


def test_the_catalogue_holds_the_memory_the_driver_reports():
    """The catalogue's own convention: vram_gib is nvidia-smi's MiB / 1024, rounded down (found by review: the H100s
    said 80 GiB, 0.35 GiB more than the 79.65 their driver reports)."""
    gpus = {g.name: g.vram_gib for g in load_catalog()}
    assert set(gpus) == set(NVIDIA_SMI_MIB)
    for name, mib in NVIDIA_SMI_MIB.items():
        assert mib / 1024 - 0.5 < gpus[name] <= mib / 1024, name


def test_a_price_of_zero_is_refused_by_the_catalogue_and_the_cost_model_naming_the_field(capsys, tmp_path):
    """Found by review: the catalogue took price_per_hour = 0, then cost() refused it naming no field."""
    path = tmp_path / "gpus.toml"
    path.write_text('[[gpu]]\nname = "free"\nvram_gib = 80\nprice_per_hour = 0\n')
    with pytest.raises(PlanError, match="price_per_hour must be a finite number > 0"):
        load_catalog(path)
    plan_fails(capsys, ["--gpu-catalog", str(path), "--cost-gpu", "free"], "price_per_hour must be a finite number > 0")
    for args, field in (((950, 500, 0.4, 0.0, 22_000), "gpu_price_per_hour"),
                        ((950, 500, 0.0, 2.4, 22_000), "api_price_per_m"),
                        ((950, -1, 0.4, 2.4, 22_000), "interactions_per_hour"),
                        ((950, 500, 0.4, 2.4, 0.0), "gpu_interactions_per_hour")):
        with pytest.raises(PlanError, match=f"^{field} must be a finite number"):
            cost(*args)
    with pytest.raises(PlanError, match="^gpu_price_per_hour must be"):
        fleet_cost(1, 0.0, 100, 200, 0.40)
