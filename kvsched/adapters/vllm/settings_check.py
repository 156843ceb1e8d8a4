"""Every KVSCHED_* setting `vllm serve --scheduler kvsched` reads, checked once before an engine starts: the policy
core's (kvsched.core.settings_check) and the engine side's (the kernels' instruction-set cap, the FP8 tier's fault
injection, the disk and shared levels, the trace recording's file). A malformed one is refused at start-up with a line naming the variable, the
same way for each, never later in a running engine."""

from __future__ import annotations

import os

from kvsched.core.settings_check import setting_errors

ENV_FAULT_EVERY = "KVSCHED_TIER_FAULT_EVERY"


def _fault_every() -> None:
    raw = os.environ.get(ENV_FAULT_EVERY, "").strip()
    if raw and (not raw.isdigit()):
        raise ValueError(f"{ENV_FAULT_EVERY}={raw!r}: a whole number >= 0 (0: no fault injection)")


def _cpu_isa() -> None:
    from kvsched.ops.cpu_features import isa_cap_from_env

    isa_cap_from_env()


def _levels() -> None:
    from kvsched.adapters.vllm.tier_levels import LevelsConfig

    LevelsConfig.from_extra({})


def _record_trace() -> None:
    from kvsched.adapters.vllm.trace_recorder import record_path_error

    if error := record_path_error():
        raise ValueError(error)


ENGINE_CHECKS = (_cpu_isa, _fault_every, _levels, _record_trace)


def engine_setting_errors() -> list[str]:
    """One message per malformed setting (each names its variable); empty when all are well-formed."""
    errors = setting_errors()
    for check in ENGINE_CHECKS:
        try:
            check()
        except ValueError as exc:
            errors.append(str(exc))
    return errors
