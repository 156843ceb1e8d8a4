"""What a turn joined to an inferred session another conversation may share (`Lineage.shared_join`) may change of it.

Two headerless users whose identical first prompt joined one inferred session share it until a turn that
extends it finishes. Meanwhile a joined turn's hints are one user's and the session is both's: its end ends nothing
(ignored and counted; the TTL expires the pin), its TTL hint only lengthens the pin, and its role hint only sets a role
where none is set (found by review: another user's `X-Agent-Role` overwrote the session's, raising or lowering the
value of the pin the first user's next turn hits; role weights are `RetentionConfig.role_weights`).

A client's retry (the same prompt again after its first request was aborted or failed) is no repeat: the session is
not shared by it (`Lineage.finished(normal=False)`), so that user's hints stay its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping

from kvsched.core.retention_records import SessionRecord
from kvsched.core.sessions import TurnHints

__all__ = ["arrival_role", "shared_finish_hints"]


def arrival_role(rec: SessionRecord, role: str | None, shared: bool, counters: MutableMapping[str, int]) -> str | None:
    """The session's role once a request with role hint `role` arrived: the hint, unless the request is `shared` and
    the session already has another role (kept; counted in `inferred_shared_roles_ignored`, once per request)."""
    if not role:
        return rec.role
    if shared and rec.role is not None and rec.role != role:
        counters["inferred_shared_roles_ignored"] += 1
        return rec.role
    return role


def shared_finish_hints(rec: SessionRecord, hints: TurnHints, ttl_s: float,
                        counters: MutableMapping[str, int]) -> TurnHints:
    """A shared turn's hints at its finish (`ttl_s`: its TTL hint as configured): no end (counted), a TTL no shorter
    than the session's, and no role other than the session's once it has one (counted at arrival: `arrival_role`)."""
    counters["inferred_shared_ends_ignored"] += hints.end
    role = hints.role if rec.role in (None, hints.role) else None
    return dataclasses.replace(hints, end=False, ttl_s=max(ttl_s, rec.ttl_s), role=role)
