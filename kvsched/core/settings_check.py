"""Every KVSCHED_* environment setting checked at once, so that `vllm serve --scheduler kvsched` refuses a malformed
one at start-up with a line naming the variable, instead of an engine process failing later on it."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from kvsched.core.compaction_config import CompactionConfig
from kvsched.core.config import RetentionConfig
from kvsched.core.lineage import LineageConfig
from kvsched.core.tenancy import admin_keys_from_env

LOADERS: tuple[Callable[[dict[str, str]], object], ...] = (
    RetentionConfig.from_env, CompactionConfig.from_env, LineageConfig.from_env, admin_keys_from_env,
)


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
