"""The kvsched settings a benchmark's `vllm serve --scheduler kvsched` ran with, for its result JSON: a result must be
reproducible from its JSON alone (found by review: `kvsched bench replay` wrote none of the TTL, pin budget, role
weights or tier size its kvsched sides read from KVSCHED_* variables and flags, so two results that differed in them
looked alike).

Read on the environment the server's process gets (`ServerSpec.environment`), by the objects the engine builds from
it: the retention policy's `RetentionConfig.from_env` (`payback_sampling` null is "auto": the engine resolves it by
whether its pool has the FP8 tier, `RetentionConfig.for_pool`), session lineage's `LineageConfig.from_env`, and the
tier's size as the plugin reads it (the command's `--kvsched-fp8-tier-gb`, else KVSCHED_FP8_TIER_GB, else "auto",
each through `parse_tier_gib`). With them, every KVSCHED_* variable set: kvsched's as set (secrets redacted), any
other by name alone (`set_settings`): set these again and an engine reads the same settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "KVSCHED_"
TIER_FLAG = "--kvsched-fp8-tier-gb"
REDACTED = "<redacted>"
SECRET_SETTINGS = frozenset({"KVSCHED_ADMIN_KEYS"})  # never written to a result file
URL_SETTINGS = frozenset({"KVSCHED_STORE_URL"})  # written with their password hidden


def set_settings(env: Mapping[str, str]) -> dict[str, str]:
    """Every KVSCHED_* variable `env` sets (blank is unset, as the engine reads it), by name: the ones kvsched reads
    as set, but for secrets, and any other (which the engine warns about at start-up,
    `settings_check.engine_setting_warnings`) with its value redacted: the engine reads nothing from it, and the
    prefix is not kvsched's alone (found by review: a Redis password, an API token or an admin key under a name of
    the prefix kvsched does not read, a misspelling among them, was written out in full)."""
    from kvsched.adapters.store.redis_store import redacted
    from kvsched.adapters.vllm.settings_check import known_setting_names
    from kvsched.core.env import env_setting

    known = known_setting_names()
    out: dict[str, str] = {}
    for name in sorted(n for n in env if n.startswith(PREFIX)):
        if (raw := env_setting(env, name)) is not None:
            secret = name in SECRET_SETTINGS or name not in known
            out[name] = REDACTED if secret else redacted(raw) if name in URL_SETTINGS else raw
    return out


def tier_gib(serve_args: Sequence[str], env: Mapping[str, str]) -> float | str:
    """The FP8 tier size a `--scheduler kvsched` command asks for, in GiB (0: off), or "auto" (the engine's rule, on
    its pool and host: the side's measured `tier_capacity_bytes` says what it came to). The flag's last value wins,
    as argparse keeps it."""
    from kvsched.core.env import env_setting
    from kvsched.core.tier_config import ENV_TIER_GB, parse_tier_gib

    asked: str | None = None
    for i, arg in enumerate(serve_args):
        if arg == TIER_FLAG and i + 1 < len(serve_args):
            asked = serve_args[i + 1]
        elif arg.startswith(TIER_FLAG + "="):
            asked = arg.partition("=")[2]
    gib = parse_tier_gib(asked if asked is not None else env_setting(env, ENV_TIER_GB))
    return "auto" if gib is None else gib


def engine_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings an engine started with environment `env` reads (ValueError naming a malformed variable, as the
    engine refuses it at start-up)."""
    from kvsched.core.config import RetentionConfig
    from kvsched.core.lineage import LineageConfig

    retention = RetentionConfig.from_env(dict(env))
    return {"retention": retention.as_dict(), "infer_sessions": LineageConfig.from_env(env).infer_sessions,
            "environment": set_settings(env)}


def side_settings(spec: Any, base: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A side's server (`kvsched.serving.ServerSpec`): its scheduler and the flags it adds; with `--scheduler kvsched`
    also the settings its engine reads (`engine_settings`) and the tier size it asks for."""
    out: dict[str, Any] = {"scheduler": spec.scheduler, "serve_args": list(spec.extra_args),
                           "num_blocks": spec.num_blocks}
    if spec.scheduler == "kvsched":
        env = spec.environment(None if base is None else dict(base))
        out.update(engine_settings(env), fp8_tier_gib=tier_gib(spec.extra_args, env))
    return out
