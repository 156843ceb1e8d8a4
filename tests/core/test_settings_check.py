"""Every KVSCHED_* setting is checked at start-up and a malformed one is named."""

from __future__ import annotations

import pytest

from kvsched.core.settings_check import setting_errors


def test_well_formed_settings_pass():
    assert setting_errors({}) == []
    assert setting_errors({"KVSCHED_INFER_SESSIONS": "0", "KVSCHED_ADMIN_KEYS": "a,b", "KVSCHED_MAX_TTL_S": "60",
                           "KVSCHED_COMPACTION": "summarize", "KVSCHED_COMPACTION_CLIENT_STRATEGIES": "cap,off",
                           "KVSCHED_ROLE_WEIGHTS": "orchestrator:3"}) == []


@pytest.mark.parametrize("env, named", [
    ({"KVSCHED_INFER_SESSIONS": "maybe"}, "KVSCHED_INFER_SESSIONS"),
    ({"KVSCHED_ADMIN_KEYS": ","}, "KVSCHED_ADMIN_KEYS"),
    ({"KVSCHED_DEFAULT_TTL_S": "soon"}, "KVSCHED_DEFAULT_TTL_S"),
    ({"KVSCHED_MAX_TTL_S": "-5"}, "KVSCHED_MAX_TTL_S"),
    ({"KVSCHED_INFERRED_FIRST_TURN_WEIGHT": "nan"}, "KVSCHED_INFERRED_FIRST_TURN_WEIGHT"),
    ({"KVSCHED_ROLE_WEIGHTS": "orchestrator"}, "KVSCHED_ROLE_WEIGHTS"),
    ({"KVSCHED_COMPACTION": "zip"}, "KVSCHED_COMPACTION"),
    ({"KVSCHED_COMPACTION_TRIGGER_TOKENS": "0"}, "KVSCHED_COMPACTION_TRIGGER_TOKENS"),
    ({"KVSCHED_COMPACTION_CLIENT_STRATEGIES": "summarize,shrink"}, "KVSCHED_COMPACTION_CLIENT_STRATEGIES"),
])
def test_a_malformed_setting_is_named(env, named):
    errors = setting_errors(env)
    assert len(errors) == 1 and errors[0].startswith(named)


def test_several_malformed_settings_are_all_reported():
    assert len(setting_errors({"KVSCHED_INFER_SESSIONS": "x", "KVSCHED_COMPACTION": "y"})) == 2
