"""How kvsched reads a KVSCHED_* variable: set to nothing (or to blanks only) is the same as unset, its default.

One rule for every setting (found by review: KVSCHED_DEFAULT_TTL_S="" failed with Python's own float error, KVSCHED_
INFER_SESSIONS="" was refused, while the tier's and levels' variables already read "" as their default). vLLM has no one
rule for its own (VLLM_PLUGINS="" allows no plugin, VLLM_CPU_KVCACHE_SPACE="" fails to parse, VLLM_LOGGING_PREFIX=""
is its default); unset-or-empty is what a shell's `VAR= command` and a YAML `env:` entry left blank mean to most
readers, and what kvsched's engine-side settings read already."""

from __future__ import annotations

from collections.abc import Mapping


def env_setting(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value as set, or None when unset or blank."""
    raw = env.get(name)
    return raw if raw is not None and raw.strip() else None
