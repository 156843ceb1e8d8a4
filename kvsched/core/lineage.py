"""Which session a turn belongs to, decided on the engine's block hash chain: branches of named sessions, and
sessions inferred for requests that name none.

Why on the hash chain: a session id is only a name, which any client can send. vLLM hashes every full block of a
prompt chained from token 0 (and the `cache_salt`), so "this prompt continues that turn's prompt" is one comparison:
the new prompt's hash at the position of the earlier prompt's last full block equals that block's hash. That gives:

- **Branches.** A turn under an existing id joins the branch whose anchor (its last turn's prompt, last full block) it
  continues. A turn that continues none starts a new branch of that id: its own session, with its own pin, TTL and end.
  It never shrinks, re-times or ends the branch it did not continue, so a second client sending a different prompt
  under a victim's id cannot take the victim's pin. (Refusing such turns instead would break honest clients that edit
  or compact their own history, and a refusal would tell a prober which ids exist.) An id has at most `MAX_BRANCHES`
  branches; a further non-continuing turn is served without a session (no pin), so it cannot crowd out a branch.
- **Inference.** A request without any session field whose prompt extends an earlier unnamed request's prompt joins
  that request's inferred session: a dictionary lookup per block hash, scanned from the prompt's end back at most
  `INFER_SCAN_BLOCKS` blocks (a turn usually adds a few blocks to its predecessor). Never across `cache_salt` or tenant.
  A branch (two requests extending the same turn): the first to arrive continues the session; any other that arrives
  while it is in flight, or extends a turn the session has moved past, becomes a session of its own (sharing the common
  prefix's blocks, which are held once).

Hashes are opaque here (bytes in vLLM). Anchors are set when a new branch's first turn arrives (so a concurrent stranger
cannot slip into a branch that has no anchor yet) and moved when a turn finishes. The table is bounded: the least
recently used entries whose session holds no pin are forgotten first.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace

from kvsched.core.sessions import SessionId, SessionKey

Anchor = tuple[int, Hashable]  # (index of the last full block of a turn's prompt, that block's chained hash)

MAX_BRANCHES = 8
INFER_SCAN_BLOCKS = 1024
INFERRED_PREFIX = "inferred-"


class InvalidLineageSetting(ValueError):
    """A KVSCHED_* setting of session lineage is malformed (reported at start-up, naming the variable)."""


@dataclass(frozen=True, slots=True)
class LineageConfig:
    """infer_sessions: give requests without a session field the session their prompt continues
    (`KVSCHED_INFER_SESSIONS`, on by default). max_entries: sessions whose anchors are remembered."""

    infer_sessions: bool = True
    max_entries: int = 100_000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, max_entries: int = 100_000) -> LineageConfig:
        env = os.environ if environ is None else environ
        raw = env.get("KVSCHED_INFER_SESSIONS")
        if raw is None:
            return cls(max_entries=max_entries)
        value = raw.strip().lower()
        if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            raise InvalidLineageSetting(f"KVSCHED_INFER_SESSIONS={raw!r}: use 1 (on, the default) or 0 (off)")
        return cls(infer_sessions=value in ("1", "true", "yes", "on"), max_entries=max_entries)


class Lineage:
    """Branch and inference bookkeeping for one engine. `is_pinned(key)` says whether a session holds a pin (such
    entries are never forgotten to make room: forgetting one would let a stranger's turn take its place)."""

    TRIM_SCAN = 1024  # entries looked past the excess when making room

    def __init__(self, config: LineageConfig, is_pinned: Callable[[SessionKey], bool] = lambda _k: False) -> None:
        self.config = config
        self.is_pinned = is_pinned
        self.anchors: OrderedDict[SessionKey, Anchor | None] = OrderedDict()  # least recently used first
        self.branches: dict[SessionKey, list[SessionKey]] = {}  # an id's branch 0 key -> its branches, oldest first
        # inferred sessions, per tenant: anchor hash -> session (the salt is in the hash; a tenant's identical prompt
        # never displaces another tenant's entry)
        self.index: dict[str | None, dict[Hashable, SessionKey]] = {}
        self.busy: Counter[SessionKey] = Counter()  # sessions with a joined turn in flight (never forgotten)
        self.counters: Counter[str] = Counter()
        self._ids = itertools.count(1)

    # ---- named sessions -------------------------------------------------------------------------------------------
    def named(self, base: SessionKey, hashes: Sequence[Hashable]) -> SessionKey | None:
        """The branch of the named session `base` (branch 0) that a turn with prompt block hashes `hashes` joins: the
        one whose anchor it continues (the deepest, if several), else a new branch; None past MAX_BRANCHES."""
        branches = self.branches.get(base)
        if branches is None:
            self.branches[base] = [base]
            self._arrived(base, hashes)
            return base
        best: SessionKey | None = None
        best_idx = -2
        for key in branches:
            anchor = self.anchors.get(key)
            if anchor is None:
                idx = -1  # nothing to continue (a prompt shorter than one block): any turn does
            else:
                idx, h = anchor
                if idx >= len(hashes) or hashes[idx] != h:
                    continue
            if idx > best_idx:
                best, best_idx = key, idx
        if best is not None:
            self.anchors.move_to_end(best)
            self.busy[best] += 1
            return best
        if len(branches) >= MAX_BRANCHES:
            self.counters["branch_overflows"] += 1
            return None
        key = replace(base, branch=max(k.branch for k in branches) + 1 if branches else 0)
        branches.append(key)
        self.counters["branches"] += 1
        self._arrived(key, hashes)
        return key

    # ---- inferred sessions ------------------------------------------------------------------------------------------
    def infer(self, cache_salt: str | None, tenant: str | None, hashes: Sequence[Hashable]) -> SessionKey:
        """The inferred session a request without a session field joins: the one whose last turn's prompt its prompt
        extends (found by block hash, newest position first), else a new one."""
        n = len(hashes)
        index = self.index.get(tenant) or {}
        for i in range(n - 1, max(n - 1 - INFER_SCAN_BLOCKS, -1), -1) if index else ():
            key = index.get(hashes[i])
            if key is None or key.cache_salt != cache_salt:
                continue
            anchor = self.anchors.get(key)
            if not self.busy[key] and anchor is not None and anchor[0] == i:
                self.busy[key] += 1
                self.anchors.move_to_end(key)
                self.counters["inference_hits"] += 1
                self.counters["inferred_turns"] += 1
                return key
            break  # the newest turn this prompt extends is taken (a branch): a session of its own
        key = SessionKey(SessionId(f"{INFERRED_PREFIX}{next(self._ids)}"), cache_salt, tenant, inferred=True)
        self.busy[key] += 1
        self.anchors[key] = None  # indexed when its turn finishes
        self.counters["inferred_sessions"] += 1
        self.counters["inferred_turns"] += 1
        self._trim()
        return key

    # ---- turn outcomes ------------------------------------------------------------------------------------------
    def finished(self, key: SessionKey, anchor: Anchor | None) -> None:
        """A turn of `key` finished; `anchor` is its prompt's last full block (None: shorter than a block). The
        session's anchor moves there (a session ended while the turn ran is registered again, as its pin is)."""
        self._release_busy(key)
        if key.inferred:
            index = self.index.setdefault(key.tenant, {})
            old = self.anchors.get(key)
            if old is not None and index.get(old[1]) is key:
                del index[old[1]]
            if anchor is not None:
                index[anchor[1]] = key
        else:
            branches = self.branches.setdefault(key if key.branch == 0 else replace(key, branch=0), [])
            if key not in branches:
                branches.append(key)
        if anchor is not None or key not in self.anchors:
            self.anchors[key] = anchor
        self.anchors.move_to_end(key)
        self._trim()

    def abandoned(self, key: SessionKey) -> None:
        """A joined turn left before it ran (aborted): an inferred session can be joined again."""
        self._release_busy(key)

    def forget(self, key: SessionKey) -> None:
        """The session ended: its anchor and branch slot go (a turn still in flight registers it again when it
        finishes)."""
        anchor = self.anchors.pop(key, None)
        index = self.index.get(key.tenant) if key.inferred else None
        if anchor is not None and index is not None and index.get(anchor[1]) is key:
            del index[anchor[1]]
            if not index:
                del self.index[key.tenant]
        if not key.inferred:
            base = replace(key, branch=0)
            branches = self.branches.get(base)
            if branches is not None and key in branches:
                branches.remove(key)
                if not branches:
                    del self.branches[base]

    def stats(self) -> dict[str, float]:
        c = self.counters
        return {"inferred_sessions": c["inferred_sessions"], "inferred_turns": c["inferred_turns"],
                "inference_hits": c["inference_hits"], "branches": c["branches"],
                "branch_overflows": c["branch_overflows"],
                "inference_table_entries": sum(map(len, self.index.values()))}

    # ---- internals ----------------------------------------------------------------------------------------------
    def _arrived(self, key: SessionKey, hashes: Sequence[Hashable]) -> None:
        self.anchors[key] = (len(hashes) - 1, hashes[-1]) if hashes else None
        self.busy[key] += 1
        self._trim()

    def _release_busy(self, key: SessionKey) -> None:
        n = self.busy[key] - 1
        if n > 0:
            self.busy[key] = n
        else:
            self.busy.pop(key, None)

    def _trim(self) -> None:
        excess = len(self.anchors) - self.config.max_entries
        if excess <= 0:
            return
        drop: list[SessionKey] = []
        # Bounded scan: entries with pins are skipped, and pins are bounded by the KV pool, not by traffic.
        for key in itertools.islice(self.anchors, excess + self.TRIM_SCAN):
            if len(drop) >= excess:
                break
            if not self.busy.get(key) and not self.is_pinned(key):
                drop.append(key)
        for key in drop:
            self.forget(key)
