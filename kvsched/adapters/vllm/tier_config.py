"""The `--kv-transfer-config` that turns kvsched's FP8 tier (and its disk and shared levels) on."""

from __future__ import annotations

import json
from typing import Any

from kvsched.adapters.vllm.tier_levels import LevelsConfig
from kvsched.core.tier_config import parse_tier_gib

CONNECTOR_NAME = "KVSchedFP8TierConnector"
MODULE_PATH = "kvsched.adapters.vllm.fp8_tier_connector"


def kv_transfer_config(tier_gb: float | str = "auto", measure_error: bool = True, **levels: Any) -> dict[str, Any]:
    """The `--kv-transfer-config` that enables kvsched's FP8 tier with `tier_gb` GiB of host memory (or "auto");
    `levels`: the disk and shared levels under it (disk_dir, disk_gb, store_url; see tier_levels.LevelsConfig)."""
    parse_tier_gib(tier_gb)  # validate early
    extra = {"tier_gb": tier_gb, "measure_error": measure_error, **{k: v for k, v in levels.items() if v is not None}}
    LevelsConfig.from_extra(extra)
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def kv_transfer_config_json(tier_gb: float | str = "auto") -> str:
    return json.dumps(kv_transfer_config(tier_gb))
