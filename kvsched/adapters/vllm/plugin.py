"""The `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly more than once per
process; it must stay idempotent and cheap. It extends vLLM's argument parser (the scheduler and middleware are loaded
by class path when a server selects them) and, on vLLM's CPU platform, asks for the AMX permission vLLM's CPU attention
needs and never asks for (`_allow_amx_tiles`).
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    try:
        from kvsched.adapters.vllm.compat import install_parser_hook

        install_parser_hook()
    except Exception:  # never take vLLM down because the plugin failed to load
        logger.exception("kvsched: failed to extend vLLM's argument parser; --scheduler kvsched is unavailable")
    try:
        _allow_amx_tiles()
    except Exception:
        logger.exception("kvsched: could not ask Linux for AMX tile permission")


def _allow_amx_tiles() -> None:
    """Every process vLLM starts on its CPU platform asks for AMX tile permission before any model runs: vLLM 0.32's
    CPU attention of a bf16 model runs tile instructions without it, and unless another kernel asked first, the
    kernel kills the worker with SIGILL (kvsched.ops.cpu_features.request_amx_tiles: the tiny model's server died at
    a first prompt of at most 4 tokens, whatever the scheduler). Where Linux refuses it, say so instead of a death."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from kvsched.ops.cpu_features import request_amx_tiles

    if request_amx_tiles() is False:
        logger.error("kvsched: this CPU has AMX but Linux refused this process the permission to use it "
                     "(arch_prctl ARCH_REQ_XCOMP_PERM): vLLM's CPU attention of a bfloat16 model will die with SIGILL "
                     "(exit code -4) at its first request; serve with --dtype float32")
