"""The `--kv-transfer-config` that turns kvsched's FP8 tier (and its disk and shared levels) on."""

from __future__ import annotations

import json
import os
from typing import Any

from kvsched.adapters.vllm.tier_levels_config import ENV_STORE_URL, LevelsConfig
from kvsched.core.tier_config import parse_tier_gib

CONNECTOR_NAME = "KVSchedFP8TierConnector"
MODULE_PATH = "kvsched.adapters.vllm.fp8_tier_connector"


def kv_transfer_config(tier_gb: float | str = "auto", measure_error: bool = True, **levels: Any) -> dict[str, Any]:
    """The `--kv-transfer-config` that enables kvsched's FP8 tier with `tier_gb` GiB of host memory (or "auto");
    `levels`: the disk and shared levels under it (disk_dir, disk_gb, store_url; see tier_levels_config.LevelsConfig)."""
    parse_tier_gib(tier_gb)  # validate early
    extra = {"tier_gb": tier_gb, "measure_error": measure_error, **{k: v for k, v in levels.items() if v is not None}}
    LevelsConfig.from_extra(extra, check_file_system=True)
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def kv_transfer_config_json(tier_gb: float | str = "auto") -> str:
    return json.dumps(kv_transfer_config(tier_gb))


def hide_store_secret(extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` (the tier's kv_connector_extra_config) fit for vLLM's log, which prints the whole KVTransferConfig
    (found by review: `vllm serve` logged the store's password): its store URL goes into this process's
    KVSCHED_STORE_URL, which the engine core and its workers inherit (child processes, fork or spawn) and the API
    server's compaction reads; a URL with a password is left in `extra` only redacted (`redis://:***@host...`), a
    marker `LevelsConfig.from_extra` resolves from the environment."""
    url = extra.get("store_url")
    if not url:
        return extra
    from kvsched.adapters.store.redis_store import is_redacted, redacted

    if is_redacted(str(url)):
        return extra  # resolved from the environment already (or refused there, by name)
    os.environ[ENV_STORE_URL] = str(url)  # the flag's store, for the engine and the compaction alike
    return {**extra, "store_url": redacted(str(url))}
