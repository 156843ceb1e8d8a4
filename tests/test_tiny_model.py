"""The tiny model in either dtype: the float32 model is the bf16 model's weights exactly, each dtype has its own cache
directory, and a server is started in the model's own dtype (vLLM's auto would downcast float32)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kvsched.serving import ServerSpec
from kvsched.tiny_model import ModelShape, build_model, ensure_tiny_model, resolve_dtype, tiny_model_dtype

SMALL = ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
                   num_key_value_heads=1, vocab_size=300)


def test_float32_model_holds_the_bf16_weights_exactly(tmp_path):
    bf16 = build_model(tmp_path / "bf16", SMALL, seed=3, dtype="bfloat16")
    fp32 = build_model(tmp_path / "fp32", SMALL, seed=3, dtype="float32")
    a, b = load_file(str(bf16 / "model.safetensors")), load_file(str(fp32 / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == torch.bfloat16 and b[name].dtype == torch.float32
        assert torch.equal(a[name].float(), b[name]), name
    assert json.loads((fp32 / "config.json").read_text())["torch_dtype"] == "float32"
    assert tiny_model_dtype(fp32) == "float32" and tiny_model_dtype(bf16) == "bfloat16"


def test_each_dtype_has_its_own_cache_directory_and_auto_is_the_cpus_fastest(tmp_path, monkeypatch):
    from kvsched.ops import cpu_features as cf

    monkeypatch.setattr("kvsched.tiny_model.SIZES", {"small": SMALL})
    a = ensure_tiny_model("small", cache_dir=tmp_path, dtype="bfloat16")
    b = ensure_tiny_model("small", cache_dir=tmp_path, dtype="float32")
    assert a != b and "float32" in b.name and "float32" not in a.name
    monkeypatch.setattr(cf, "cpu_features", lambda: cf.CpuFeatures("x86_64", True, False, False, False))
    assert resolve_dtype("auto") == "float32" and ensure_tiny_model("small", cache_dir=tmp_path) == b
    monkeypatch.setattr(cf, "cpu_features", lambda: cf.CpuFeatures("x86_64", True, True, False, True))
    assert resolve_dtype(None) == "bfloat16"
    with pytest.raises(ValueError, match="unknown tiny-model dtype 'fp64'"):
        resolve_dtype("fp64")


def test_a_server_is_started_in_the_tiny_models_dtype(tmp_path):
    fp32 = build_model(tmp_path / "fp32", SMALL, dtype="float32")
    argv = ServerSpec(model=fp32).argv(8000)
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert ServerSpec(model=fp32, dtype="bfloat16").argv(8000).count("bfloat16") == 1
    assert "--dtype" not in ServerSpec(model=tmp_path).argv(8000)  # not a tiny model: vLLM decides
