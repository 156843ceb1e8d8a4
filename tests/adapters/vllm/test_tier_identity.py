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


def hub_config(model: str, revision: object, instance_id: str = "") -> NS:
    return NS(model_config=NS(model=model, revision=revision, hf_config=HF(), quantization=None, dtype=torch.bfloat16),
              cache_config=NS(block_size=32, cache_dtype="auto"), instance_id=instance_id)


def test_a_hub_model_is_identified_by_its_resolved_commit_not_the_revision_name() -> None:
    """vLLM 0.32 keeps `--revision` as huggingface_hub's ResolvedRevision: its text is the name asked for ("main"),
    the commit is in `.resolved` (found by review: two engines on two commits of one repo shared an identity, so KV
    of other weights was served)."""
    from huggingface_hub.hf_api import ResolvedRevision

    a = tier_blob.identity_of(hub_config("org/assistant", ResolvedRevision("a" * 40, None)), GEO, 1)
    b = tier_blob.identity_of(hub_config("org/assistant", ResolvedRevision("b" * 40, None)), GEO, 1)
    again = tier_blob.identity_of(hub_config("org/assistant", ResolvedRevision("a" * 40, "main"), "x"), GEO, 1)
    assert a[0] != b[0] and a[0] == again[0]  # the commit alone: shared by every engine on it, on any host
    assert a[1]["revision"] == "a" * 40 and "unshareable" not in a[1]


def test_a_single_file_checkpoint_is_sampled_like_a_directorys_weights(tmp_path: Path) -> None:
    """`--model /models/x.gguf`: the file itself was never hashed (found by review)."""
    f = tmp_path / "model.gguf"
    f.write_bytes(b"weights v1" * 1000)
    v1 = tier_blob.identity_of(hub_config(str(f), None), GEO, 1)
    assert v1[0] == tier_blob.identity_of(hub_config(str(f), None, "other engine"), GEO, 1)[0]
    f.write_bytes(b"WEIGHTS v2" * 1000)
    assert tier_blob.identity_of(hub_config(str(f), None), GEO, 1)[0] != v1[0]
    assert v1[1]["weights"][0][:2] == ("model.gguf", 10_000) and "unshareable" not in v1[1]


def test_weights_nothing_identifies_give_an_identity_of_this_engine_alone(tmp_path: Path, caplog) -> None:
    """A Hub id whose revision was not resolved (offline, an error) and no local file: nothing says which weights
    the blocks were computed with, so no other engine (another host, a restart) shares them; the scheduler and the
    workers of one engine (one vLLM instance id) do. The disk level is off: no restart could read its files."""
    from kvsched.adapters.vllm.tier_levels import TierLevels
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig

    one, desc = tier_blob.identity_of(hub_config("org/assistant", "main", "17"), GEO, 1)
    assert one == tier_blob.identity_of(hub_config("org/assistant", "main", "17"), GEO, 1)[0]
    assert one != tier_blob.identity_of(hub_config("org/assistant", "main", "18"), GEO, 1)[0]
    assert one != tier_blob.identity_of(hub_config("org/assistant", "main"), GEO, 1)[0]
    assert "no resolved commit" in desc["unshareable"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "unshareable" in tier_blob.identity_of(hub_config(str(empty), None), GEO, 1)[1]
    levels = TierLevels(LevelsConfig(disk_dir=str(tmp_path / "disk"), store_url="redis://127.0.0.1:1/0"), one, desc,
                        1024, 1)
    # Neither level: the store's blocks would be restored by no other replica, and the identity names this host, which
    # a multi-node engine's workers do not share (found by review)
    assert levels.disk is None and not (tmp_path / "disk").exists() and levels.store is None
    assert "cannot be identified" in caplog.text
