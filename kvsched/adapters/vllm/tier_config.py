"""The `--kv-transfer-config` that turns kvsched's FP8 tier (and its disk and shared levels) on."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from kvsched.adapters.vllm.settings_check import FALSE_WORDS, TRUE_WORDS
from kvsched.adapters.vllm.tier_levels_config import ENV_STORE_URL, LevelsConfig
from kvsched.core.tier_config import TierConfigError, parse_tier_gib

ENV_STAGE_MB = "KVSCHED_TIER_STAGE_MB"
MAX_STAGE_MB = 65536.0
CONNECTOR_NAME = "KVSchedFP8TierConnector"
MODULE_PATH = "kvsched.adapters.vllm.fp8_tier_connector"


def kv_transfer_config(tier_gb: float | str = "auto", measure_error: bool = True, **levels: Any) -> dict[str, Any]:
    """The `--kv-transfer-config` that enables kvsched's FP8 tier with `tier_gb` GiB of host memory (or "auto");
    `levels`: the disk and shared levels under it (disk_dir, disk_gb, store_url; see tier_levels_config.LevelsConfig)."""
    parse_tier_gib(tier_gb)  # validate early
    measure_error_of({"measure_error": measure_error})
    extra = {"tier_gb": tier_gb, "measure_error": measure_error, **{k: v for k, v in levels.items() if v is not None}}
    LevelsConfig.from_extra(extra, check_file_system=True)
    return {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra}


def measure_error_of(extra: dict[str, Any]) -> bool:
    """kv_connector_extra_config's `measure_error` (the tier's quantization error on /metrics; default on) read as the
    KVSCHED_* booleans are (settings_check: 1/true/yes/on, 0/false/no/off; JSON true/false and 0/1 too; blank or
    absent: the default). Found by review: it was read with bool(), so "false" and "0" left it on. TierConfigError
    names the key otherwise."""
    raw = extra.get("measure_error")
    if raw is None or isinstance(raw, bool):
        return True if raw is None else raw
    word = str(raw).strip().lower() if isinstance(raw, (str, int)) else None
    if word is None or word not in TRUE_WORDS | FALSE_WORDS:
        raise TierConfigError(f"kv_connector_extra_config.measure_error must be a boolean (true/false, 1/0, yes/no, "
                              f"on/off), got {raw!r}")
    return word in TRUE_WORDS or not word


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


def stage_bytes_of(extra: dict[str, Any], default: int) -> tuple[int, bool]:
    """The copies' host staging in bytes (tier_link.StagePlan), and whether it was set: kv_connector_extra_config's
    `stage_mb`, else KVSCHED_TIER_STAGE_MB, else `default`. TierConfigError names the key or variable when the value
    is not a number of MiB in (0, MAX_STAGE_MB]."""
    raw, name = extra.get("stage_mb"), "kv_connector_extra_config.stage_mb"
    if raw is None:
        raw, name = os.environ.get(ENV_STAGE_MB), ENV_STAGE_MB
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default, False
    try:
        if isinstance(raw, bool):
            raise TypeError
        mib = float(raw)
    except (TypeError, ValueError):
        raise TierConfigError(f"{name} must be a number of MiB, got {raw!r}") from None
    if not (math.isfinite(mib) and 0 < mib <= MAX_STAGE_MB):
        raise TierConfigError(f"{name} must be > 0 and at most {MAX_STAGE_MB:.0f} MiB, got {raw!r}")
    return max(int(mib * 2**20), 1), True
