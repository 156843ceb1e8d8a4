"""The gap statistics' classes are bounded: roles are clients' strings (`X-Agent-Role`, `vllm_xargs.agent_role`)."""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

import pytest

from kvsched.core.config import RetentionConfig
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import KNOWN_ROLES, SessionId, SessionKey, TurnHints


def make(clock, **overrides):
    config = replace(RetentionConfig(payback_sampling=0, max_sessions=100), **overrides)
    return RetentionPolicy(config, clock, total_blocks=1_000_000, bytes_per_token=1024.0)


def two_turns(p, clock, k, role, gap=1.0):
    hints = TurnHints(role=role)
    for _ in range(2):  # the second turn's start observes a gap
        p.request_arrived(k, hints)
        p.turn_started(k, 0)
        p.turn_finished(k, hints, 16, 1)
        clock.advance(gap)


def test_made_up_roles_share_the_class_of_no_role(clock):
    """Found by review: one gap history per role string any client sent, never dropped and shared by every API key
    (20,000 made-up roles: 20,000 classes and their histories)."""
    p = make(clock)
    for i in range(500):
        two_turns(p, clock, SessionKey(SessionId(f"s{i}"), tenant="b"), f"agent-{i:08x}")
    kept = {*KNOWN_ROLES, *RetentionConfig().role_weights, None}
    assert set(p.gaps.by_role) <= kept and {role for role, _ in p.gaps.by_phase} <= kept
    assert len(p.gaps.by_role[None]) == 256 and p.gaps.by_role.get("agent-00000001") is None  # a full window


def test_known_and_weighted_roles_keep_classes_of_their_own(clock):
    weights = MappingProxyType({**RetentionConfig().role_weights, "return 0.35": 1.0})
    p = make(clock, role_weights=weights)
    two_turns(p, clock, SessionKey(SessionId("a")), "return 0.35", gap=3.0)
    two_turns(p, clock, SessionKey(SessionId("b")), "critic", gap=5.0)
    two_turns(p, clock, SessionKey(SessionId("c")), "someone-else", gap=7.0)
    assert list(p.gaps.by_role["return 0.35"].recent) == [pytest.approx(3.0)]  # finish to the next start
    assert list(p.gaps.by_role["critic"].recent) == [pytest.approx(5.0)]
    assert list(p.gaps.by_role[None].recent) == [pytest.approx(7.0)]
    assert p.gaps.mean_residual("someone-else", 1, 0.0) == p.gaps.mean_residual(None, 1, 0.0)
