"""Every KVSCHED_* setting `vllm serve --scheduler kvsched` reads, checked once before an engine starts: the policy
core's (kvsched.core.settings_check) and the engine side's (the API server's body timeout, the kernels' instruction-set
cap, the FP8 tier's fault injection, the disk and shared levels, the trace files). A malformed one is refused at
start-up with a line naming the variable, the same way for each, never later in a running engine. A KVSCHED_*
variable nothing reads (a misspelling) is warned about, not refused."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from kvsched.adapters.http_body import BODY_TIMEOUT_S
from kvsched.core.settings_check import setting_errors, setting_names, unknown_setting_warnings

ENV_FAULT_EVERY = "KVSCHED_TIER_FAULT_EVERY"
ENV_TRACE = "KVSCHED_TRACE"
ENV_TRACE_SCORES = "KVSCHED_TRACE_SCORES"
ENV_TRACE_MAX_MB = "KVSCHED_TRACE_MAX_MB"
ENV_BODY_TIMEOUT = "KVSCHED_BODY_TIMEOUT_S"  # the API server's: a generation request's body not all arrived by then
DEFAULT_TRACE_MAX_MB = 1024.0  # a decision is ~100 bytes of trace: ten million, then the trace stops (logged)
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
# Read by name outside the engine (kvsched.tiny_model, kvsched.sim.mooncake: where models and traces are cached;
# setup.py and `make test`: a failed C++ build is an error; the API server's mark for its engine: compat.ENV_KEYED)
OTHER_SETTINGS = frozenset({"KVSCHED_CACHE_DIR", "KVSCHED_REQUIRE_EXT", "KVSCHED_KEYED_SERVER",
                            "KVSCHED_PURE_PYTHON", "KVSCHED_MYPYC",  # these two: kvsched/compiled.py, setup.py
                            "KVSCHED_PROXY_MAX_BODY_BYTES"})  # Ray's HTTP proxy's (kvsched/adapters/ray/proxy_body.py)


def fault_every(environ: Mapping[str, str] | None = None) -> int:
    """KVSCHED_TIER_FAULT_EVERY (tests: corrupt every n-th stored slot; 0 or blank: never), read by the tier connector
    and checked here with the same rule: ASCII digits only, since `int()` refuses "²" that `isdigit()` accepts."""
    raw = (os.environ if environ is None else environ).get(ENV_FAULT_EVERY, "").strip()
    if not raw:
        return 0
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"{ENV_FAULT_EVERY}={raw!r}: a whole number >= 0 (0: no fault injection)")
    return int(raw)


def trace_path(environ: Mapping[str, str] | None = None) -> str | None:
    """KVSCHED_TRACE: the file the engine appends one JSON line per decision to, or None (unset or blank)."""
    raw = (os.environ if environ is None else environ).get(ENV_TRACE, "").strip()
    return os.path.expanduser(raw) if raw else None


def positive_number(name: str, default: float, what: str, environ: Mapping[str, str] | None = None) -> float:
    """A finite number above 0 from `name` (unset or blank: `default`); ValueError naming the variable and `what` it
    is ("a size in MB") if malformed."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}={raw!r}: {what} above 0 (default {default:g})")
    return value


def size_limit_mb(name: str, default: float, environ: Mapping[str, str] | None = None) -> float:
    """A size limit in MB from `name` (unset or blank: `default`); ValueError naming the variable if malformed."""
    return positive_number(name, default, "a size in MB", environ)


def body_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    """KVSCHED_BODY_TIMEOUT_S: seconds the API server waits for a generation request's whole body before its 408
    (`http_io.read_body`; unset or blank: `http_body.BODY_TIMEOUT_S`, 60); ValueError naming it unless a finite number
    above 0."""
    return positive_number(ENV_BODY_TIMEOUT, BODY_TIMEOUT_S, "a number of seconds", environ)


def trace_max_mb(environ: Mapping[str, str] | None = None) -> float:
    """KVSCHED_TRACE_MAX_MB: the decision trace stops once its file reaches this size (the bytes already in it too)."""
    return size_limit_mb(ENV_TRACE_MAX_MB, DEFAULT_TRACE_MAX_MB, environ)


def trace_scores(environ: Mapping[str, str] | None = None) -> bool:
    """KVSCHED_TRACE_SCORES as a boolean: "0" or "off" must not turn the scored release order on."""
    raw = (os.environ if environ is None else environ).get(ENV_TRACE_SCORES, "")
    word = raw.strip().lower()
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise ValueError(f"{ENV_TRACE_SCORES}={raw!r}: use 1, true, yes or on (or 0, false, no, off to leave it off)")
    return word in TRUE_WORDS


def trace_path_error(environ: Mapping[str, str] | None = None) -> str | None:
    """Why KVSCHED_TRACE cannot be appended to (the engine would die opening it); None if it can or is unset."""
    path = trace_path(environ)
    if path is None:
        return None
    where, file = f"{ENV_TRACE}={path!r}", Path(path)
    if file.is_dir():
        return f"{where}: a directory; name a file to append the trace to"
    if not file.parent.is_dir():
        return f"{where}: directory {str(file.parent)!r} does not exist"
    if not os.access(file if file.exists() else file.parent, os.W_OK):
        return f"{where}: {'the file' if file.exists() else 'its directory'} is not writable"
    return None


def _body_timeout() -> None:
    body_timeout_s()


def _fault_every() -> None:
    fault_every()


def _cpu_isa() -> None:
    from kvsched.ops.cpu_features import isa_cap_from_env

    isa_cap_from_env()


def _ghost() -> None:
    from kvsched.ops.ghost import check_ghost_setting

    check_ghost_setting()


def _levels() -> None:
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig

    LevelsConfig.from_extra({}, check_file_system=True)


def _record_trace() -> None:
    from kvsched.adapters.vllm.trace_recorder import record_path_error

    if error := record_path_error():
        raise ValueError(error)


def _trace() -> None:
    trace_scores()
    trace_max_mb()
    if error := trace_path_error():
        raise ValueError(error)


def _tier_stage() -> None:
    from kvsched.adapters.vllm.tier_config import stage_bytes_of

    stage_bytes_of({}, 0)


ENGINE_CHECKS = (_body_timeout, _cpu_isa, _fault_every, _ghost, _levels, _record_trace, _tier_stage, _trace)


def engine_setting_errors() -> list[str]:
    """One message per malformed setting (each names its variable); empty when all are well-formed."""
    errors = setting_errors()
    for check in ENGINE_CHECKS:
        try:
            check()
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def known_setting_names() -> frozenset[str]:
    """Every KVSCHED_* variable kvsched reads, from the constants where each is defined (tests/adapters/vllm/
    test_settings_env.py fails when a variable read somewhere is missing here)."""
    from kvsched.adapters.vllm import compaction_shared, trace_recorder
    from kvsched.adapters.vllm import tier_levels_config as levels
    from kvsched.adapters.vllm.tier_config import ENV_STAGE_MB
    from kvsched.core.tier_config import ENV_TIER_GB  # (the connector's, without importing vLLM)
    from kvsched.ops.cpu_features import ISA_ENV
    from kvsched.ops.ghost import GHOST_ENV

    engine = {ENV_BODY_TIMEOUT, ENV_FAULT_EVERY, ENV_TRACE, ENV_TRACE_SCORES, ENV_TRACE_MAX_MB, ENV_TIER_GB, ISA_ENV,
              GHOST_ENV, compaction_shared.ENV_STORE_URL, trace_recorder.ENV_RECORD, trace_recorder.ENV_MAX_MB,
              levels.ENV_DISK_DIR,
              levels.ENV_DISK_GB, levels.ENV_STORE_URL, levels.ENV_KV_TTL, levels.ENV_STATE_TTL, levels.ENV_REPLICA,
              levels.ENV_FETCH_MB, ENV_STAGE_MB}
    return setting_names() | engine | OTHER_SETTINGS


def engine_setting_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per KVSCHED_* variable set that kvsched does not read, with the closest known name."""
    return unknown_setting_warnings(known_setting_names(), environ)
