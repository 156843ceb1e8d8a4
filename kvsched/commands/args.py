"""The commands' option checks: they live in `kvsched.bench.args`, one layer down, so that `kvsched bench` uses the same
ones (tests/test_layering.py: bench may not import commands)."""

from __future__ import annotations

from kvsched.bench.args import (
    MAX_COUNT,
    MAX_GIB,
    Limit,
    check_args,
    check_out_dir,
    check_out_path,
    count,
    number,
    only_apply,
    only_with,
    refuse,
    seed,
)

__all__ = ["MAX_COUNT", "MAX_GIB", "Limit", "check_args", "check_out_dir", "check_out_path", "count", "number",
           "only_apply", "only_with", "refuse", "seed"]
