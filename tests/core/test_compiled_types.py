"""RetentionConfig values of every number type a library caller, a sweep or a bench passes (1e5 for a count, numpy
scalars, 1 for a flag) run the mypyc-compiled policy as they ran pure Python: the config normalizes each field to the
exact type it declares (`RetentionConfig._normalize_types`), once, where the value enters. Before, the compiled policy
raised TypeError at construction or at the first turn ("int object expected; got float")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvsched import compiled
from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionKey, TurnHints
from kvsched.sim.mooncake import convert_file
from kvsched.sim.replay import ReplayConfig, replay
from kvsched.sim.trace import Trace

DATA = Path(__file__).parents[1] / "sim" / "data"
LOOSE = [dict(max_sessions=1e5), dict(max_sessions=np.int64(5)), dict(payback_window=1000.0, payback_sampling=2),
         dict(payback_sampling=np.int64(2), payback_cooldown=np.int32(10)), dict(payback_from_start=1,
         payback_sampling=1), dict(return_threshold=np.float32(0.5)), dict(shared_pin_answers=np.int16(2)),
         dict(default_ttl_s=np.float32(3), max_ttl_s=10), dict(role_weights={"worker": np.float32(2), "critic": 3}),
         dict(payback_from_start=np.bool_(True), payback_sampling=4)]
COMPILED = pytest.mark.skipif(compiled.mode != "compiled", reason=f"kvsched runs {compiled.mode!r}: pure Python took "
                              "these values anyway; the compiled build's type checks did not (`make ext` builds it)")


@COMPILED
@pytest.mark.parametrize("kw", LOOSE, ids=lambda kw: ",".join(kw))
def test_numbers_of_any_type_build_a_policy_that_runs_a_turn(kw):
    cfg = RetentionConfig(**kw)
    for f in ("max_sessions", "payback_window", "payback_cooldown", "shared_pin_answers"):
        assert type(getattr(cfg, f)) is int
    assert type(cfg.payback_from_start) is bool and type(cfg.default_ttl_s) is float
    assert all(type(w) is float for w in cfg.role_weights.values())
    policy = RetentionPolicy(cfg.for_pool(tier=False), lambda: 1.0, total_blocks=100, bytes_per_token=1.0)
    key = SessionKey("a")
    policy.request_arrived(key, TurnHints(), False, False)
    policy.turn_started(key, 0)
    policy.turn_finished(key, TurnHints(), 64, 4)
    assert policy.sessions[key].turns == 1


@COMPILED
def test_the_simulator_replays_with_such_a_config(tmp_path):
    """The simulator's public API (`replay` with a ReplayConfig a sweep built) on a Mooncake-converted slice."""
    convert_file(DATA / "mooncake_conversation_slice.jsonl", path := tmp_path / "conv.jsonl")
    trace = Trace.load(path)
    retention = RetentionConfig(max_sessions=1e5, payback_sampling=np.int64(2), payback_from_start=1,
                                default_ttl_s=np.float32(60))
    result = replay(trace, "kvsched", ReplayConfig(capacity_blocks=64, retention=retention))
    assert result.tokens_saved >= 0


@pytest.mark.parametrize("kw, message", [
    (dict(max_sessions=1.5), "max_sessions must be a whole number"), (dict(payback_window="10"), "payback_window"),
    (dict(payback_from_start=2), "payback_from_start must be true or false"),
    (dict(default_ttl_s="30"), "default_ttl_s must be a number"), (dict(role_weights={"w": "x"}), "role_weights"),
])
def test_a_value_that_is_no_such_number_is_a_value_error_naming_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        RetentionConfig(**kw)

