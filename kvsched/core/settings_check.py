"""Every KVSCHED_* environment setting checked at once, so that `vllm serve --scheduler kvsched` refuses a malformed
one at start-up with a line naming the variable, instead of an engine process failing later on it."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields

from kvsched.core.compaction_config import CompactionConfig
from kvsched.core.config import RetentionConfig
from kvsched.core.lineage import LineageConfig
from kvsched.core.tenancy import admin_keys_from_env

LOADERS: tuple[Callable[[dict[str, str]], object], ...] = (
    RetentionConfig.from_env, CompactionConfig.from_env, LineageConfig.from_env, admin_keys_from_env,
)
PREFIX = "KVSCHED_"
# Read by name in kvsched.core.lineage and kvsched.core.tenancy (no constant there to import)
NAMED_SETTINGS = frozenset({"KVSCHED_INFER_SESSIONS", "KVSCHED_ADMIN_KEYS"})


def setting_errors(environ: Mapping[str, str] | None = None) -> list[str]:
    """One message per malformed setting group (each names its variable); empty when all are well-formed."""
    env = dict(os.environ if environ is None else environ)
    errors = []
    for load in LOADERS:
        try:
            load(env)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def setting_names() -> frozenset[str]:
    """The KVSCHED_* variables the policy core reads, derived from its configs' fields so a new field is known."""
    names = {f"{PREFIX}{f.name.upper()}" for f in fields(RetentionConfig)}
    names |= {f"{PREFIX}COMPACTION_{f.name.upper()}" for f in fields(CompactionConfig) if f.name != "strategy"}
    return frozenset(names | {f"{PREFIX}COMPACTION"} | NAMED_SETTINGS)


def unknown_setting_warnings(known: Iterable[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per KVSCHED_* variable set but read by nothing (a misspelling is otherwise silently ignored), with
    the closest known name. Warnings, not errors: other tools may use the same prefix."""
    env = os.environ if environ is None else environ
    names = sorted(set(known))
    out = []
    for var in sorted(v for v in env if v.startswith(PREFIX) and v not in names):
        close = difflib.get_close_matches(var, names, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        out.append(f"{var} is not a kvsched setting and is ignored{hint}")
    return out


def near_miss_warnings(known: Iterable[str], environ: Mapping[str, str] | None = None,
                       cutoff: float = 0.85) -> list[str]:
    """Like `unknown_setting_warnings`, for a tool that reads only some of kvsched's settings (the simulator reads the
    policy's, not the engine's): only the variables that look like a misspelling of one it reads."""
    env = os.environ if environ is None else environ
    names = sorted(set(known))
    out = []
    for var in sorted(v for v in env if v.startswith(PREFIX) and v not in names):
        close = difflib.get_close_matches(var, names, n=1, cutoff=cutoff)
        if close:
            out.append(f"{var} is not a kvsched setting and is ignored; did you mean {close[0]}?")
    return out
