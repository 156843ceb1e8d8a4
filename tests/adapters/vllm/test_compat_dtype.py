"""The one-line warning `vllm serve` gives when a float32 model would be downcast to bfloat16 on a CPU that only
emulates bf16 (found by the first run on an AVX2-only CPU: each linear layer ~6x slower, and kvsched said nothing)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402
from kvsched.ops.cpu_features import CpuFeatures  # noqa: E402
from tests.adapters.vllm.test_compat_levels import parser as levels_parser  # noqa: E402

AVX2_ONLY = CpuFeatures(arch="x86_64", avx2=True, avx512=False, avx512_bf16=False, amx=False)
WITH_BF16 = CpuFeatures(arch="x86_64", avx2=True, avx512=True, avx512_bf16=True, amx=False)


def parser() -> argparse.ArgumentParser:
    """The levels test's engine parser, plus the flags this warning reads."""
    p = levels_parser()
    p.add_argument("model_tag", nargs="?", default=None)  # `vllm serve M`
    p.add_argument("--model", default="Qwen/Qwen3-0.6B")  # vLLM's default when no model is given
    p.add_argument("--revision", default=None)
    p.add_argument("--dtype", default="auto")
    return p


def model_dir(tmp_path: Path, dtype: str, key: str = "torch_dtype") -> str:
    d = tmp_path / f"model-{dtype}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", key: dtype}))
    return str(d)


@pytest.fixture
def cpu(monkeypatch):
    def use(features: CpuFeatures) -> None:
        monkeypatch.setattr("kvsched.ops.cpu_features.cpu_features", lambda: features)

    use(AVX2_ONLY)
    return use


def warnings_of(argv: list[str], capsys) -> list[str]:
    capsys.readouterr()
    parser().parse_args(argv)
    return [line for line in capsys.readouterr().err.splitlines() if "--dtype float32" in line]


def test_a_float32_model_served_with_dtype_auto_on_a_cpu_without_bf16_gets_one_warning(tmp_path, cpu, capsys) -> None:
    lines = warnings_of([model_dir(tmp_path, "float32"), "--scheduler", "kvsched"], capsys)
    assert len(lines) == 1 and lines[0].startswith("kvsched: warning: ")
    assert "bfloat16" in lines[0] and "emulates" in lines[0]


def test_the_model_given_with_model_and_the_newer_dtype_key_are_read_too(tmp_path, cpu, capsys) -> None:
    assert len(warnings_of(["--model", model_dir(tmp_path, "float32", key="dtype"), "--scheduler", "kvsched"],
                           capsys)) == 1


@pytest.mark.parametrize("extra", [["--dtype", "float32"], ["--dtype", "bfloat16"], ["--dtype", "float"]])
def test_a_dtype_given_is_left_alone_and_not_warned_about(tmp_path, cpu, capsys, extra) -> None:
    ns = parser().parse_args([model_dir(tmp_path, "float32"), "--scheduler", "kvsched", *extra])
    assert "--dtype float32" not in capsys.readouterr().err
    assert ns.dtype == extra[1]


def test_dtype_auto_is_not_changed_by_the_warning(tmp_path, cpu, capsys) -> None:
    assert parser().parse_args([model_dir(tmp_path, "float32"), "--scheduler", "kvsched"]).dtype == "auto"


def test_no_warning_for_a_bf16_model_a_cpu_with_native_bf16_or_stock_vllm(tmp_path, cpu, capsys) -> None:
    assert warnings_of([model_dir(tmp_path, "bfloat16"), "--scheduler", "kvsched"], capsys) == []
    f32 = model_dir(tmp_path, "float32")
    assert warnings_of([f32], capsys) == []  # kvsched not selected: not ours to say
    cpu(WITH_BF16)
    assert warnings_of([f32, "--scheduler", "kvsched"], capsys) == []


def test_a_model_that_cannot_be_read_locally_gives_no_warning(tmp_path, cpu, capsys) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert compat.checkpoint_dtype(str(broken)) is None
    assert compat.checkpoint_dtype(str(tmp_path / "missing")) is None
    assert compat.checkpoint_dtype("no-such-org/no-such-model-kvsched") is None  # not in the HF cache: no download
    assert warnings_of([str(broken), "--scheduler", "kvsched"], capsys) == []
