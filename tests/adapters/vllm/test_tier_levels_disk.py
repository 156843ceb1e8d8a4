"""The disk level's failure modes at the engine boundary (tier_levels, tier_disk, tier_writer): what an exception in
its bookkeeping, a directory that goes away or cannot be written, or a hung disk do to the engine (found by review)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kvsched.adapters.vllm.tier_levels import TierLevels
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
from kvsched.core.tier import TierConfig, TierDirectory

IDENT = "ef" * 16
BLOCK = 1000
CHAIN = [bytes([i]) * 32 for i in range(8)]


def levels(tmp_path: Path, disk_gb: float | None = 1.0) -> TierLevels:
    return TierLevels(LevelsConfig(disk_dir=str(tmp_path / "disk"), disk_gb=disk_gb), IDENT, {"model": "t"}, BLOCK, 1)


def test_an_exception_in_the_disk_bookkeeping_switches_the_level_off_never_the_engine(tmp_path: Path,
                                                                                       caplog) -> None:
    """A turn's end and a host-tier eviction (inside a demotion) call the disk's bookkeeping on vLLM's step: what it
    raises is logged once and the disk level goes off; the step goes on."""
    lv = levels(tmp_path)
    assert lv.disk is not None

    def boom(*args: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    lv.disk.plan_writes = boom  # type: ignore[method-assign]
    host = TierDirectory(TierConfig(budget_bytes=1 * BLOCK), BLOCK, value_of=lambda owner: 0.0)
    host.on_evict = lv.on_host_evict
    host.demote("a", [(CHAIN[0], 0)])
    with caplog.at_level(logging.ERROR, logger="vllm.kvsched.fp8_tier"):
        host.demote("b", [(CHAIN[1], 1)])  # evicts a's block: a spill is planned, and raises
        assert lv.disk is None
        lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:3])], None)  # the level is off: nothing planned
        lv.session_ended("s")
    assert not lv.take_ops() and lv.counters["disk_level_errors"] == 1
    assert [r.levelname for r in caplog.records] == ["ERROR"] and "without the disk level" in caplog.text


@pytest.mark.parametrize("where", ["turn", "end"])
def test_a_turns_end_or_a_sessions_end_that_raises_in_the_disk_is_contained(tmp_path: Path, where: str) -> None:
    lv = levels(tmp_path)
    assert lv.disk is not None
    lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:2])], None)
    lv.take_ops()

    def boom(*args: object) -> None:
        raise KeyError("corrupt books")

    if where == "turn":
        lv.disk.plan_writes = boom  # type: ignore[method-assign]
        lv.turn_finished("s", [(k, i) for i, k in enumerate(CHAIN[:4])], None)
    else:
        lv.disk.drop_owner = boom  # type: ignore[method-assign]
        lv.session_ended("s")
    assert lv.disk is None and not lv.take_ops()
    lv.written([(CHAIN[0], True)], disk_full=True)  # late reports of the writes in flight: ignored
    assert "disk_tier_bytes" not in lv.stats()
