"""The `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly more than once per
process; it must stay idempotent and cheap. It only extends vLLM's argument parser; the scheduler and middleware are
loaded by class path when a server selects them.
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
