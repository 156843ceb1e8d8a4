"""Engine side of session lineage: which session (branch of a named one, or an inferred one) a vLLM request joins,
decided on the request's own block hashes and tokens (`kvsched.core.lineage` holds the rules and says why).

Runs in `SessionPins`' hooks on the engine-core thread. Per request it costs a few dictionary lookups and one digest of
the prompt's tokens past its last full block: the named session's branch anchors are compared at one position each;
inference looks up block hashes from the prompt's end. A failure here never reaches vLLM: the request is then served
without a session (logged once).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.core.lineage import Anchor, Lineage, LineageConfig
from kvsched.core.lineage_tail import OPAQUE, Opaque, Tail, overlaps, tail_of
from kvsched.core.retention import RetentionPolicy
from kvsched.core.sessions import SessionKey, TurnHints

logger = logging.getLogger(__name__)
_NO_SESSION: tuple[None, TurnHints] = (None, TurnHints())
_EMPTY_TAIL = Tail(0, 0, ())


class SessionResolver:
    """`in_use(key)`: something is still kept under that key (a new branch never gets its number; default: the policy
    holds its record). `keyed`: the API server checks API keys (`compat.keyed_server`), so a request that reaches the
    engine without a tenant is not scoped to one and gets no session."""

    def __init__(self, policy: RetentionPolicy, enabled: bool = True, config: LineageConfig | None = None,
                 hash_block: int = 0, in_use: Callable[[SessionKey], bool] | None = None,
                 keyed: bool | None = None) -> None:
        self.policy = policy
        self.hash_block = hash_block  # tokens per block hash (0: unknown; lineage then compares hashes only)
        self.enabled = enabled  # prefix caching on: without it there is no hash chain to follow
        self.config = config or LineageConfig.from_env(max_entries=policy.config.max_sessions)
        self.keyed = compat.keyed_server() if keyed is None else keyed
        sessions = policy.sessions
        self.lineage = Lineage(self.config, is_pinned=lambda k: (r := sessions.get(k)) is not None and r.pinned,
                               in_use=in_use or sessions.__contains__)
        self.anchors: dict[str, tuple[Anchor | None, Tail | None]] = {}  # request id -> its prompt's last full block
        # and the tokens past it
        # requests that joined an inferred session another conversation may share -> they repeat its last prompt
        self.shared: dict[str, bool] = {}
        self._failed = False

    def _known(self, key: SessionKey) -> SessionKey | None:
        rec = self.policy.sessions.get(key)
        return None if rec is None else rec.key

    def resolve(self, request: Any) -> tuple[SessionKey | None, TurnHints]:
        """The session `request` joins and its hints; (None, default) for none."""
        try:
            key, hints = compat.request_session(request, self._known)
            if key is not None and self.keyed and key.tenant is None:
                return _NO_SESSION
            hashes, tokens, opaque = compat.prompt_view(request)
            block = self.hash_block
            tail: Tail | None = None
            if not block:  # no token comparisons: the hashes only
                tokens, opaque = None, ()
            else:
                start = len(hashes) * block
                if tokens is None:  # prompt embeddings: nothing past the hashed blocks can be compared
                    tokens, tail = (), OPAQUE if overlaps(opaque, start, 1 << 62) else _EMPTY_TAIL
                else:
                    if tokens and type(tokens[0]) is not int:  # numpy ids (in-process engine): the compiled lineage
                        tokens = [int(t) for t in tokens]  # takes exact ints (a TypeError dropped the session)
                    tail = tail_of(tokens, start, opaque)
            if key is not None:
                named = self.lineage.named(key, hashes, tokens, block, tail, opaque)
                # past the id's branch limit: served as a request without a session field would be
                key = named if named is not None else self._infer(request, hashes, tokens, opaque, hints.end)
            else:
                key = self._infer(request, hashes, tokens, opaque, hints.end)
            if key is None:
                return _NO_SESSION
            if key.inferred and self.lineage.shared_join:
                self.shared[request.request_id] = self.lineage.shared_repeat
            self.anchors[request.request_id] = ((len(hashes) - 1, hashes[-1]) if hashes else None, tail)
            return key, hints
        except Exception:  # never take the engine down over session bookkeeping
            if not self._failed:
                self._failed = True
                logger.exception("kvsched: session lineage failed; the request is served without a session")
            return _NO_SESSION

    def _infer(self, request: Any, hashes: list[Any], tokens: Sequence[int] | None, opaque: Opaque,
               ending: bool = False) -> SessionKey | None:
        if not (self.enabled and self.config.infer_sessions):
            return None
        salt, tenant, may_infer = compat.request_scope(request)
        if not may_infer or (self.keyed and tenant is None):
            return None
        return self.lineage.infer(salt, tenant, hashes, tokens, self.hash_block, opaque, ending)

    def shared_turn(self, request_id: str) -> bool:
        """The request joined an inferred session another conversation may share (`Lineage.shared_join`): its end and
        TTL hints are not that conversation's (`RetentionPolicy.finish_hints`)."""
        return request_id in self.shared

    def sharing(self, request_id: str) -> tuple[bool, bool]:
        """(`shared_turn`, and it repeats the session's last prompt: its answer is pinned beside the other user's,
        `SessionRecord.joins_pin`)."""
        return request_id in self.shared, self.shared.get(request_id, False)

    def finished(self, request_id: str, key: SessionKey, request: Any = None, moved: bool = True) -> None:
        """The turn of `key` that `request` ran finished: the session's anchors move to its prompt and its answer
        (unless not `moved`: a side turn that kept the session's longer pin). vLLM's finish status says whether it
        ended normally: a repeat of an aborted or failed turn's prompt is a retry, not another user's."""
        try:  # as `_safely` does, written out: this runs for every finished turn
            anchor, tail = self.anchors.pop(request_id, (None, None))
            self.shared.pop(request_id, None)
            block = self.hash_block
            if request is None:
                computed, normal = None, True
            elif block:
                computed, normal = compat.finish_anchor(request, block)
            else:
                computed, normal = None, compat.finished_normally(request)
            self.lineage.finished(key, anchor, tail, computed, moved, normal)
        except Exception:  # a bookkeeping bug costs inference accuracy, never the engine
            self._failed_once()

    def abandoned(self, request_id: str, key: SessionKey) -> None:
        self.anchors.pop(request_id, None)
        self.shared.pop(request_id, None)
        self._safely(self.lineage.abandoned, key)

    def forget(self, key: SessionKey, request_id: str | None = None) -> None:
        """The session ended (by its request `request_id`'s last turn, when given: its anchor goes too)."""
        if request_id is not None:
            self.anchors.pop(request_id, None)
            self.shared.pop(request_id, None)
        self._safely(self.lineage.forget, key)

    def _safely(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a bookkeeping bug costs inference accuracy, never the engine
            self._failed_once()

    def _failed_once(self) -> None:
        """Log the exception being handled, the first time only."""
        if not self._failed:
            self._failed = True
            logger.exception("kvsched: session lineage failed; sessions may be inferred less well")
