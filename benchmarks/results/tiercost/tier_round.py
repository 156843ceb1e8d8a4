"""The round both probes here run: one `kvsched bench sched --tier` round (seed 0) of SESSIONS sessions whose FP8 tier
is TIER_GIB GiB (the bench's default never fills), and its tier directory."""

from __future__ import annotations

from typing import Any


def tier_round(sessions: int, gib: str) -> tuple[Any, Any]:
    from kvsched.adapters.vllm import tier_config
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
    from kvsched.bench.sched import _Round
    from kvsched.tiny_model import ensure_tiny_model

    config = tier_config.kv_transfer_config
    tier_config.kv_transfer_config = lambda *a, **k: config(gib)  # type: ignore[assignment]
    r = _Round(KVSCHED_SCHEDULER, ensure_tiny_model("test"), 0, sessions, True, True)
    return r, r.s.kvsched.tier.directory
