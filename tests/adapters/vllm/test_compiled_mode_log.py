"""The engine says at start whether kvsched's per-turn bookkeeping runs compiled (kvsched/compiled.py)."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("vllm")

from kvsched import compiled  # noqa: E402
from tests.adapters.vllm.conftest import sched  # noqa: E402


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_scheduler_logs_the_bookkeepings_mode_once(harness_cfg):
    logger = logging.getLogger("vllm.kvsched.scheduler")  # vLLM's own logger tree: no propagation to rely on
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        sched(harness_cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [line for line in handler.lines if "bookkeeping" in line] == [
        f"kvsched: per-turn bookkeeping {compiled.mode}"]
