"""The identity in every disk and shared block key (`tier_blob.identity_of`): what changes the KV's meaning changes
it, what does not (a copy of the same weights on another host) does not (found by review, /tmp/rev_store r10)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
import torch

from kvsched.adapters.vllm import tier_blob

GEO = NS(layers=("l0", "l1"), heads=2, rows=32, content=64, dtype=torch.bfloat16, mode="quantize")


class HF:
    def to_json_string(self, use_diff: bool = False) -> str:
        return '{"model_type": "llama", "num_hidden_layers": 2}'


def identity(model: Path, quantization: str | None = None, dtype: torch.dtype = torch.bfloat16) -> str:
    cfg = NS(model_config=NS(model=str(model), revision=None, hf_config=HF(), quantization=quantization, dtype=dtype),
             cache_config=NS(block_size=32, cache_dtype="auto"))
    return tier_blob.identity_of(cfg, GEO, 1)[0]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "models" / "llama"
    d.mkdir(parents=True)
    (d / "model-00001.safetensors").write_bytes(os.urandom(3 << 20))
    (d / "model-00002.safetensors").write_bytes(os.urandom(1000))
    (d / "config.json").write_text("{}")
    return d


def test_weight_quantization_and_dtype_change_the_identity(model: Path) -> None:
    """A replica quantizing the same weights on the fly (`--quantization fp8`) or computing in another dtype makes
    other KV from the same prompt: it must not read the other's blocks."""
    idents = {identity(model), identity(model, "fp8"), identity(model, None, torch.float16)}
    assert len(idents) == 3


def test_the_tier_format_is_part_of_the_identity(model: Path, monkeypatch) -> None:
    before = identity(model)
    monkeypatch.setattr(tier_blob, "TIER_FORMAT", tier_blob.TIER_FORMAT + 1)
    assert identity(model) != before


def test_copied_weights_share_the_identity_and_other_weights_do_not(model: Path) -> None:
    """The weight files' mtimes were part of the identity: hosts holding copies of the same weights (copied, synced,
    downloaded at other times) never shared a block. Now their sampled contents are."""
    before = identity(model)
    for f in model.iterdir():
        os.utime(f, ns=(1, 1))  # a copy without its times
    assert identity(model) == before
    shard = model / "model-00001.safetensors"
    data = bytearray(shard.read_bytes())
    step = (len(data) - tier_blob.WEIGHT_HEAD_BYTES) // tier_blob.WEIGHT_SAMPLES
    data[tier_blob.WEIGHT_HEAD_BYTES + step * 3 + 5] ^= 0xFF  # other weights of the same size, in the 4th sample
    shard.write_bytes(bytes(data))
    assert identity(model) != before


def test_fine_tuned_weights_of_the_same_shapes_get_another_identity(model: Path) -> None:
    """Weights replaced in place by a fine-tune (same names and sizes), even with the old files' times kept."""
    before = identity(model)
    shard = model / "model-00001.safetensors"
    st = shard.stat()
    data = bytearray(shard.read_bytes())
    for i in range(tier_blob.WEIGHT_HEAD_BYTES, len(data), 4096):  # every tensor nudged, as a fine-tune does
        data[i] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size and identity(model) != before
