"""A block framed by an engine whose attention backend splits each manager block into kernel blocks is served only to
engines of the same split (found by review, /tmp/rev_tierw r2: in RAW mode the payloads of two splits have the same
length, and a ratio-1 engine restored a ratio-2 engine's block with its heads' token halves swapped)."""

from __future__ import annotations

from pathlib import Path

import torch

from kvsched.adapters.vllm import tier_blob
from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_layout import RAW, TierGeometry, layer_views
from kvsched.adapters.vllm.tier_levels import DISK, Fetch, LevelOps, Publish
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker

NB, H, R, C = 4, 2, 4, 8
GEO = TierGeometry(("l0",), H, R, C, torch.uint8, RAW, "LBHNC")  # what the spec says: the same for both engines
IDENT, KEY = "ab" * 16, bytes(32)


def engine(tmp_path: Path, ratio: int) -> tuple[TierLevelsWorker, torch.Tensor]:
    cache = torch.zeros(NB * ratio, H, R // ratio, C, dtype=torch.uint8)
    store = TierStore(layer_views({"l0": cache}, GEO, NB), RAW)
    return TierLevelsWorker(LevelsConfig(disk_dir=str(tmp_path)), IDENT, {}, 0, 1, store), cache


def tokens(cache: torch.Tensor, block: int) -> list[list[int]]:
    """Token t of head h of manager block `block`, whatever the split."""
    ratio = cache.shape[0] // NB
    per = R // ratio
    return [[int(cache[block * ratio + t // per, h, t % per, 0]) for t in range(R)] for h in range(H)]


def run(w: TierLevelsWorker, ops: LevelOps) -> None:
    w.before_stores(ops)
    w.writer.flush()
    w.start_fetch(ops)
    w.fetcher.flush()


def test_a_block_of_another_kernel_block_split_is_recomputed_never_restored_scrambled(tmp_path: Path) -> None:
    a, a_cache = engine(tmp_path, 1)
    for h in range(H):
        for t in range(R):
            a_cache[0, h, t, :] = 10 * h + t + 1
    run(a, LevelOps(publishes=[Publish(KEY, 0, True, False)]))
    assert a.report()[0] == [(KEY, True)]

    split, split_cache = engine(tmp_path, 2)  # same model, spec and identity; a backend with half-size kernel blocks
    run(split, LevelOps(fetches=[Fetch(KEY, 0, DISK)]))
    assert split.report()[2] == [(KEY, DISK)] and split.counters["disk_read_failures"] == 1
    assert split.tier.load([0], [1]) == [1] and tokens(split_cache, 1) == [[0] * R] * H  # never restored

    same, same_cache = engine(tmp_path, 1)  # a restart of the same engine still restores it
    run(same, LevelOps(fetches=[Fetch(KEY, 0, DISK)]))
    assert same.tier.load([0], [2]) == [] and tokens(same_cache, 2) == tokens(a_cache, 0)


def test_without_a_split_blocks_keep_the_scheduler_s_identity(tmp_path: Path) -> None:
    """Blocks written before the split entered the frame, and by engines without one, stay readable."""
    from kvsched.adapters.vllm.tier_layout import kernel_split

    assert kernel_split(engine(tmp_path, 2)[0].tier.views) and not kernel_split(engine(tmp_path, 1)[0].tier.views)
    assert tier_blob.frame_identity(IDENT, []) == IDENT
    assert tier_blob.frame_identity(IDENT, [("l0", 0, (2, 2, 8)), ("l0", 1, (2, 2, 8))]) != IDENT
