"""The `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly more than once per
process; it must stay idempotent and cheap. It extends vLLM's argument parser and asks vLLM to copy kvsched's settings
to Ray workers; the scheduler and middleware are loaded by class path when a server selects them.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
_registered = False
RAY_PREFIXES_VAR = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"


def carry_settings_to_ray_workers() -> None:
    """vLLM copies to its Ray workers only the environment variables of its own prefixes (VLLM_, HF_, NCCL_, ...:
    `vllm/ray/ray_env.py`) and those of the prefixes this variable adds: add KVSCHED_, so a worker on another node runs
    with the engine's kvsched settings (the FP8 tier's, the shared store's URL) instead of the defaults. Additive: the
    operator's own prefixes stay. Runs before the engine core creates its executor (plugins load first)."""
    prefixes = [p.strip() for p in os.environ.get(RAY_PREFIXES_VAR, "").split(",") if p.strip()]
    if "KVSCHED_" not in prefixes:
        os.environ[RAY_PREFIXES_VAR] = ",".join([*prefixes, "KVSCHED_"])


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    carry_settings_to_ray_workers()
    try:
        from kvsched.adapters.vllm.compat import install_parser_hook

        install_parser_hook()
    except Exception:  # never take vLLM down because the plugin failed to load
        logger.exception("kvsched: failed to extend vLLM's argument parser; --scheduler kvsched is unavailable")
