"""The disk level under tensor parallelism: a block is one file per rank, and an engine that dies between its ranks'
writes leaves some ranks' files of a block only. Found by review (/tmp/rev_tier/partial_rank.py): the start-up scan
indexed only blocks every rank wrote, so those files were never indexed, counted or deleted, and each crash left more
of them past the budget."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvsched.adapters.vllm.tier_blob import framed_len
from kvsched.adapters.vllm.tier_disk import PARTIAL_GRACE_S, DiskFiles
from kvsched.adapters.vllm.tier_levels import TierLevels
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig

IDENT = "ab" * 16
PAYLOAD = 8208  # the test model's KV block in FP8 with its scales
FRAME = b"x" * framed_len(32, PAYLOAD)
WHOLE, FRESH = b"\x01" * 32, b"\x02" * 32
CRASHED = [bytes([0x10 + i]) * 32 for i in range(3)]


def ranks(root: Path) -> tuple[DiskFiles, DiskFiles]:
    a, b = (DiskFiles(root, IDENT, {"model": "m"}, rank=r, world_size=2) for r in (0, 1))
    return a, b


def test_blocks_only_some_ranks_wrote_are_deleted_at_start_up_once_old_and_counted_until_then(tmp_path: Path) -> None:
    r0, r1 = ranks(tmp_path)
    r0.write(WHOLE, FRAME)
    r1.write(WHOLE, FRAME)
    hour_ago = time.time() - 3600
    for key in CRASHED:  # three crashes between rank 0's write and rank 1's, an hour ago
        r0.write(key, FRAME)
        os.utime(r0.path(key), (hour_ago, hour_ago))
    r1.write(FRESH, FRAME)  # a dying engine's rank 1 wrote this a moment ago: rank 0's may still land
    taken = os.stat(r0.path(WHOLE)).st_blocks * 512  # one file, as the file system counts it
    lv = TierLevels(LevelsConfig(disk_dir=str(tmp_path), disk_gb=20 * taken / 2**30), IDENT, {"model": "m"},
                    PAYLOAD, 2)
    assert lv.disk is not None and list(lv.disk.written) == [WHOLE]
    assert not any(r0.path(k).exists() for k in CRASHED)
    assert r1.path(FRESH).exists() and r0.path(WHOLE).exists() and r1.path(WHOLE).exists()
    assert lv.stats()["disk_tier_partial_blocks_removed"] == 3
    # the young file counts against the budget: (20 files' bytes - 1) // 2 files a block
    assert lv.disk.capacity == 9 and lv.disk.block_bytes == 2 * taken


def test_a_partial_block_goes_once_its_newest_file_is_past_the_grace(tmp_path: Path) -> None:
    r0, r1 = ranks(tmp_path)
    r0.write(FRESH, FRAME)
    written = os.stat(r0.path(FRESH)).st_mtime
    sched = DiskFiles(tmp_path, IDENT, {"model": "m"}, rank=0, world_size=2)
    assert sched.scan(now=written + PARTIAL_GRACE_S - 1) == [] and r0.path(FRESH).exists()
    assert sched.partial_removed == 0 and sched.partial_bytes > 0 and sched.found_bytes == 0
    assert sched.scan(now=written + PARTIAL_GRACE_S + 1) == [] and not r0.path(FRESH).exists()
    assert sched.partial_removed == 1 and sched.partial_bytes == 0
    assert sched.scan(now=written + PARTIAL_GRACE_S + 1) == [] and sched.partial_removed == 0  # gone: counted once
