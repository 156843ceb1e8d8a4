"""Engine side of the session routes: list (paged) and end sessions, within the caller's tenant scope.

Called through the engine-core utility (`SessionPins.handle`) with msgpack-able arguments that kvsched's API-server
middleware built after authenticating the caller (`kvsched.core.tenancy.Caller`). Returns plain dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Protocol
from weakref import WeakKeyDictionary

from kvsched.adapters.vllm import compat
from kvsched.core.retention import RetentionPolicy, SessionRecord
from kvsched.core.session_index import SessionIndex
from kvsched.core.sessions import InvalidSessionInput, SessionKey, validate_session_id
from kvsched.core.tenancy import DEFAULT_PAGE, Caller, InvalidQuery, PageQuery, decode_cursor, page


class Pins(Protocol):
    policy: RetentionPolicy
    pinned: dict[SessionKey, list[list[Any]]]  # per session, its pinned blocks per KV-cache group (vLLM's blocks)

    def _end(self, key: SessionKey) -> None: ...

    def stats(self) -> dict[str, float]: ...


# Each policy's owner index, made at its first session-route call. (SessionPins could own it instead: one line in its
# __init__, `self.session_index = SessionIndex(self.policy)`, read here.)
_INDEXES: WeakKeyDictionary[RetentionPolicy, SessionIndex] = WeakKeyDictionary()


def handle_admin(pins: Pins, op: str, args: tuple[Any, ...]) -> dict[str, Any] | None:
    """`list(caller, limit, cursor, summary[, with_stats])`, `end(session_id, caller)`, `end_all(caller)`; None for
    another op. `with_stats`: a page also carries the scheduler's stats (one engine call, not two).

    The API server always passes the caller, all arguments packed in one list (see `compat.call_scheduler`); a call
    without one comes from inside the engine process (tests, the offline API) and acts as an admin."""
    if len(args) == 1 and isinstance(args[0], dict) and isinstance(args[0].get(compat.PACKED_ARGS), list):
        args = tuple(args[0][compat.PACKED_ARGS])
    try:
        if op == "list":
            caller, limit, cursor, summary, *more = args if args else (None, DEFAULT_PAGE, None, False)
            if summary == "pinned_ids":  # one pass over the caller's sessions (a router's KV index)
                return {"pinned_session_ids": sorted({str(k.session_id) for k, r in owned(pins.policy, _caller(caller))
                                                      if r.pinned_blocks > 0})}
            result = list_sessions(pins.policy, _caller(caller), PageQuery(
                int(limit), decode_cursor(cursor) if cursor else None, bool(summary)), pins.pinned)
            if more and more[0] and not summary:
                result["stats"] = pins.stats()
            return result
        if op == "end":
            sid = validate_session_id(args[0])
            return end_sessions(pins, _caller(args[1] if len(args) > 1 else None), lambda k: k.session_id == sid)
        if op == "end_all":
            return end_sessions(pins, _caller(args[0] if args else None), lambda _k: True)
    except (IndexError, TypeError, ValueError, InvalidSessionInput, InvalidQuery) as exc:
        return {"error": str(exc)}
    return None


def _caller(args: Any) -> Caller:
    return Caller(admin=True) if args is None else Caller.from_args(args)


def owned(policy: RetentionPolicy, caller: Caller) -> list[tuple[SessionKey, SessionRecord]]:
    """The caller's sessions: a tenant's from the owner index, at the cost of its own sessions; an admin's scope is
    every tenant's, the whole table."""
    sessions = policy.sessions
    if caller.admin:
        return [(k, r) for k, r in sessions.items() if caller.owns(k)]
    index = _INDEXES.get(policy)
    if index is None:
        index = _INDEXES[policy] = SessionIndex(policy)
    return [(k, sessions[k]) for k in index.owned(caller.tenant, caller.cache_salt)]


def list_sessions(policy: RetentionPolicy, caller: Caller, query: PageQuery,
                  pinned: Mapping[SessionKey, list[list[Any]]] | None = None) -> dict[str, Any]:
    """A page of the caller's sessions, or their counts (`query.summary`). `pinned`: the blocks each pin holds, so
    that the summary counts a block several sessions share (a common system prompt) once, as `/metrics` does (found
    by review: 97 blocks reported in a pool of 47); `pinned_session_blocks` is the per-session sum."""
    mine = owned(policy, caller)
    if query.summary:
        per_session = sum(r.pinned_blocks for _, r in mine)
        distinct = per_session if pinned is None else len(
            {b.block_id for k, _ in mine for group in pinned.get(k, ()) for b in group})
        return {"summary": {"sessions": len(mine), "pinned_sessions": sum(1 for _, r in mine if r.pinned),
                            "pinned_blocks": distinct, "pinned_session_blocks": per_session,
                            "inferred_sessions": sum(1 for k, _ in mine if k.inferred)}}
    now = policy.clock()
    rows, cursor = page(mine, query)
    out = []
    for rec in rows:
        row = asdict(policy.view_of(rec, now))
        if caller.admin:
            row["tenant"] = rec.key.tenant
        out.append(row)
    return {"sessions": out, "next_cursor": cursor, "total": len(mine)}


def end_sessions(pins: Pins, caller: Caller, match: Any) -> dict[str, Any]:
    keys = [k for k, _ in owned(pins.policy, caller) if match(k)]
    for key in keys:
        pins._end(key)
    return {"ended": len(keys)}
