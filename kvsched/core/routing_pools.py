"""Which model pool serves a request: by model name, then agent role, and long sessions to a long-context pool.

The sizing guide's "reduced context cap": run most replicas at the p95 context (`--max-model-len` 8K-16K, four times
the sessions of a 32K cap) and send the rare sessions that grow past a token threshold to a pool of high-memory
replicas. A session that moved there stays there (its KV is there now).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from kvsched.core.routing import RoutingConfigError


class UnknownModel(LookupError):
    """No pool serves the requested model (the API answers HTTP 404)."""


@dataclass(frozen=True, slots=True)
class PoolRule:
    """One pool as the selector sees it. `models`: names it answers to; `roles`: agent roles it serves;
    `long_context`: the pool that takes sessions past `PoolRouting.long_context_tokens`."""

    name: str
    models: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    long_context: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise RoutingConfigError(f"pool name must be a short word (letters, digits, - or _), got {self.name!r}")


@dataclass(frozen=True, slots=True)
class PoolRouting:
    pools: tuple[PoolRule, ...]
    long_context_tokens: int | None = None  # sessions past this many tokens move to the long-context pool
    default_pool: str | None = None  # for requests naming no known model or role; default: the first pool
    remembered_sessions: int = 100_000
    _by_name: dict[str, PoolRule] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pools:
            raise RoutingConfigError("at least one pool is required")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise RoutingConfigError(f"pool names must be unique, got {names}")
        object.__setattr__(self, "_by_name", {p.name: p for p in self.pools})
        if self.default_pool is not None and self.default_pool not in self._by_name:
            raise RoutingConfigError(f"default_pool {self.default_pool!r} is not a pool ({', '.join(names)})")
        longs = [p.name for p in self.pools if p.long_context]
        if len(longs) > 1:
            raise RoutingConfigError(f"at most one long_context pool, got {longs}")
        if self.long_context_tokens is not None:
            if not isinstance(self.long_context_tokens, int) or self.long_context_tokens < 1:
                raise RoutingConfigError(f"long_context_tokens must be a positive integer, got "
                                         f"{self.long_context_tokens!r}")
            if not longs:
                raise RoutingConfigError("long_context_tokens is set but no pool has long_context: true")

    def pool(self, name: str) -> PoolRule:
        return self._by_name[name]

    @property
    def long_pool(self) -> PoolRule | None:
        return next((p for p in self.pools if p.long_context), None)


class PoolSelector:
    def __init__(self, routing: PoolRouting) -> None:
        self.routing = routing
        self._long_sessions: OrderedDict[str, None] = OrderedDict()

    def select(self, model: str | None, role: str | None = None, session_id: str | None = None,
               session_tokens: int = 0) -> PoolRule:
        """The pool for one request: the long-context pool for a long session, else the pools serving `model`
        (all, when it is None), the one serving `role` first. Raises UnknownModel for a model no pool serves. A
        request of no session goes to the long-context pool by its own size, remembered nowhere (found by review:
        an unnamed conversation's opening, remembered like a session, sent every new conversation with that opening
        there once one had grown)."""
        r = self.routing
        long_pool = r.long_pool
        if long_pool is not None and (
                (session_id is not None and session_id in self._long_sessions)
                or (r.long_context_tokens is not None and session_tokens > r.long_context_tokens)):
            if not long_pool.models or model is None or model in long_pool.models:
                if session_id is not None:
                    self._remember(session_id)
                return long_pool
        candidates = [p for p in r.pools if not p.long_context and (model is None or not p.models
                                                                    or model in p.models)]
        if not candidates and long_pool is not None and (model is None or model in long_pool.models):
            return long_pool
        if not candidates:
            served = sorted({m for p in r.pools for m in p.models})
            raise UnknownModel(f"model {model!r} is not served here; models: {', '.join(served)}")
        if role:
            for p in candidates:
                if role in p.roles:
                    return p
        if r.default_pool is not None and r.pool(r.default_pool) in candidates:
            return r.pool(r.default_pool)
        return candidates[0]

    def forget(self, session_id: str) -> None:
        """The session ended: a new one under its id starts where its own size says (found by review: it started in
        the long-context pool)."""
        self._long_sessions.pop(session_id, None)

    def _remember(self, session_id: str) -> None:
        self._long_sessions[session_id] = None
        self._long_sessions.move_to_end(session_id)
        while len(self._long_sessions) > self.routing.remembered_sessions:
            self._long_sessions.popitem(last=False)
