"""Which session a turn belongs to, decided on the engine's block hash chain: branches of named sessions, and
sessions inferred for requests that name none.

Why on the hash chain: a session id is only a name, which any client can send. vLLM hashes every full block of a
prompt chained from token 0 (and the `cache_salt`), so "this prompt continues that turn" is one comparison: the new
prompt's hash at the position of the earlier turn's last full block equals that block's hash. A finished turn is
anchored twice: on its prompt's last full block, with the prompt's tail past it (`kvsched.core.lineage_tail`: a
template may render those last tokens anew), and on the last full block of its prompt and answer (the *computed*
anchor: a prompt repeating it repeats the answer, which no stranger can send). A turn continues a session when it
repeats either.

- **Branches.** A turn under an existing id joins the branch whose anchor it continues (the deepest, if several). A
  turn that continues none starts a new branch of that id: its own session, with its own pin, TTL and end. It never
  shrinks, re-times or ends the branch it did not continue, so a second client sending a different prompt under a
  victim's id cannot take the victim's pin. (Refusing such turns instead would break honest clients that edit or
  compact their own history, and a refusal would tell a prober which ids exist.) An id has at most `MAX_BRANCHES`
  branches; when they are all taken, those holding no pin (expired, released) make room, and a non-continuing turn
  that still finds no room gets no branch: the adapter serves it as a request without a session field (session
  inference, within the same tenant and salt), so it cannot crowd out a branch that holds a pin, and an app sending
  one constant `user` for every conversation keeps its conversations past the eighth (found by review: they got no
  session at all). A branch number is never handed out again while the retention policy or the tier (host copies,
  the disk level's books) still holds something under it (`in_use`): its history, and its end, would go to the
  stranger (found by review three times; the third: a host copy evicted to disk, deleted by the stranger's end).
- **Inference.** A request without any session field whose prompt continues an earlier unnamed request's turn joins
  that request's inferred session: a dictionary lookup per block hash, scanned from the prompt's end back at most
  `INFER_SCAN_BLOCKS` blocks (a turn usually adds a few blocks to its predecessor). A hash holds up to `BUCKET`
  sessions (found by review: one per hash, and users whose short first turns after a shared system prompt ended on
  the same block overwrote one another); the turn joins the newest that it continues and that has no turn in flight.
  Never across `cache_salt` or tenant. A turn with an end hint joins only a session whose answer it repeats (found by
  review: another user's identical first prompt, which joins as a retry would, ended the first user's session and
  took its pin and tier copies with it; such a turn now ends a session of its own). A branch (two requests extending
  the same turn): the first to arrive continues the session; any other that arrives while it is in flight, or
  extends a turn the session has moved past, becomes a session of its own (sharing the common prefix's blocks, which
  are held once). A request that repeats the session's last prompt instead of extending it (another user's identical
  first prompt, or a retry) joins it too, so two conversations may share it until one extends it (`shared`): a turn
  joined meanwhile ends no session and shortens no pin (`RetentionPolicy.finish_hints`; found by review: either
  user's ending turn ended both, and one user's TTL hint set the pin the other would hit). Not a repeat of a prompt
  no turn answered (each that sent it ended aborted or failed, `finished(normal=False)`): that is the client's retry,
  whose hints stay its own (found by review: a retry's user could no longer end the session).

Hashes are opaque here (bytes in vLLM). Anchors are set when a new branch's first turn arrives (so a concurrent stranger
cannot slip into a branch that has no anchor yet) and moved when a turn finishes. The table is bounded: the least
recently used entries whose session holds no pin are forgotten first.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from kvsched.core.env import env_setting
from kvsched.core.lineage_tail import TAIL_SLACK, Opaque, Tail, repeats, repeats_last_prompt, tail_of
from kvsched.core.sessions import SessionId, SessionKey

__all__ = ["Anchor", "BUCKET", "INFER_SCAN_BLOCKS", "INFERRED_PREFIX", "InvalidLineageSetting", "Lineage",
           "LineageConfig", "MAX_BRANCHES", "TAIL_SLACK", "Tail", "tail_of"]

Anchor = tuple[int, Hashable]  # (index of a turn's last full block, that block's chained hash)

MAX_BRANCHES = 8
BUCKET = 16  # inferred sessions remembered per block hash (the newest finished)
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
        raw = env_setting(env, "KVSCHED_INFER_SESSIONS")
        if raw is None:
            return cls(max_entries=max_entries)
        value = raw.strip().lower()
        if value not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
            raise InvalidLineageSetting(f"KVSCHED_INFER_SESSIONS={raw!r}: use 1 (on, the default) or 0 (off)")
        return cls(infer_sessions=value in ("1", "true", "yes", "on"), max_entries=max_entries)


class _Entry:
    """One session's lineage state: its key, anchors (`anchor` the prompt's last full block, with `tail` the prompt's
    tokens past it when known; `computed` the last full block of prompt and answer), how many joined turns are in
    flight (never forgotten), when its last turn finished (a sequence number) and the conversation its last turn sent
    (compaction's digest of the client's messages, when the API server computed one). `answered`: a turn that sent
    the last prompt finished normally (a repeat of it may be another user's; otherwise it is a retry)."""

    __slots__ = ("key", "anchor", "tail", "computed", "busy", "finished", "conversation", "shared", "answered")

    def __init__(self, key: SessionKey, anchor: Anchor | None, tail: Tail | None = None) -> None:
        self.key = key
        self.anchor = anchor
        self.tail = tail
        self.computed: Anchor | None = None
        self.busy = 0
        self.finished = 0
        self.conversation: str | None = None
        self.shared = False  # a turn repeated its last prompt and none extended it since: two conversations may hold it
        self.answered = False


class Lineage:
    """Branch and inference bookkeeping for one engine. `is_pinned(key)` says whether a session holds a pin (such
    entries are never forgotten to make room: forgetting one would let a stranger's turn take its place); `in_use(key)`
    whether anything is still kept under that key (its number is then never given to a new branch).

    A turn is described by its prompt's block hashes and, on the engine, its tokens, the hash block size and the
    ranges of its positions that cannot be compared by token (`opaque`: images, embeddings); without tokens only the
    hashes are compared (the simulator). Per request: `named` is one lookup of the id plus a comparison or two per
    branch, `infer` one lookup per block hash scanned and a tail comparison per session of the hash it stops at;
    `finished` one lookup. Entries are ordered by their last finished turn (the forgetting order)."""

    TRIM_SCAN: Final = 1024  # entries looked past the excess when making room

    def __init__(self, config: LineageConfig, is_pinned: Callable[[SessionKey], bool] = lambda _k: False,
                 in_use: Callable[[SessionKey], bool] = lambda _k: False) -> None:
        self.config = config
        self.is_pinned = is_pinned
        self.in_use = in_use
        self.entries: OrderedDict[SessionKey, _Entry] = OrderedDict()  # least recently finished first
        self.branches: dict[SessionKey, list[_Entry]] = {}  # an id's branch 0 key -> its branches, oldest first
        # inferred sessions, per tenant: anchor hash -> sessions anchored there, oldest first (the salt is in the hash;
        # a tenant's identical prompt never displaces another tenant's entry)
        self.index: dict[str | None, dict[Hashable, list[_Entry]]] = {}
        self.indexed = 0  # entries in the index's lists
        self.counters: Counter[str] = Counter()
        self._ids: dict[str | None, itertools.count[int]] = {}  # per tenant: a number tells no key of another's
        self._finished = itertools.count(1)
        self.created: SessionKey | None = None  # the branch the last `named` call started (None: it joined one)
        self.shared_join = False  # the last `infer` call joined a session another conversation may share (`shared`)
        self.shared_repeat = False  # ... and repeated its last prompt: its answer joins the pin (`JoinedPins`)
        self._retired: OrderedDict[SessionKey, int] = OrderedDict()  # an id's highest branch forgotten to make room

    # ---- named sessions -------------------------------------------------------------------------------------------
    def named(self, base: SessionKey, hashes: Sequence[Hashable], tokens: Sequence[int] | None = None,
              block: int = 0, tail: Tail | None = None, opaque: Opaque = ()) -> SessionKey | None:
        """The branch of the named session `base` (branch 0) that a turn with prompt block hashes `hashes` joins: the
        one whose anchor it continues (the deepest, if several), else a new branch (anchored on this prompt, `tail` its
        tokens past its last full block); None past MAX_BRANCHES."""
        self.created = None
        branches = self.branches.get(base)
        if branches is None:
            branches = self.branches[base] = []
        best: _Entry | None = None
        best_idx = -2
        for e in branches:
            idx = _depth(e, hashes, tokens, block, opaque, named=True)
            if idx > best_idx:
                best, best_idx = e, idx
        if best is not None:
            best.busy += 1
            return best.key
        if len(branches) >= MAX_BRANCHES:  # make room from branches that hold nothing (no pin, no turn running)
            for e in [e for e in branches if not e.busy and not self.is_pinned(e.key)]:
                self._retire(e.key)
            branches = self.branches.setdefault(base, [])
        if len(branches) >= MAX_BRANCHES:
            self.counters["branch_overflows"] += 1
            return None
        number = max(max((e.key.branch for e in branches), default=-1), self._retired.get(base, -1)) + 1
        key = base._replace(branch=number) if number else base
        while self.in_use(key):  # e.g. a branch ended while its turn ran, or forgotten while its pin is kept
            key = base._replace(branch=key.branch + 1)
        if key.branch:
            self.counters["branches"] += 1
        n = len(hashes)
        self._add(key, (n - 1, hashes[-1]) if n else None, branches).tail = tail
        self.created = key
        return key

    def superseded(self, key: SessionKey, conversations: Collection[str] | None = None) -> SessionKey | None:
        """The branch that a turn rewritten by kvsched's own compaction leaves behind when it starts branch `key`: the
        idle branch of the same id, whose turn finished last, that sent one of `conversations` (the digests of the
        rewritten request's own message prefixes: a branch whose last turn's messages the rewritten request's messages
        continue; the rewritten prompt no longer continues its tokens, and no later turn will). `conversations` None
        (a replay, whose sessions are one conversation each): the idle branch whose turn finished last. None if there
        is none, or if `key` is not the branch the last `named` call created (a rewrite that joined a branch leaves
        nothing behind). Only a turn the server's compaction rewrote may end a branch: a client's turn that continues
        no branch never ends another (module docstring), and a rewrite never ends another conversation under the same
        id (another client's, or the same user's other conversation)."""
        if key.inferred or key != self.created:
            return None
        best: _Entry | None = None
        for e in self.branches.get(key._replace(branch=0), ()):
            if e.key == key or e.busy or not e.finished or (best is not None and e.finished <= best.finished):
                continue
            if conversations is None or e.conversation in conversations:
                best = e
        return None if best is None else best.key

    def note_conversation(self, key: SessionKey, conversation: str) -> None:
        """The turn of `key` that just arrived sent `conversation` (see `superseded`)."""
        e = self.entries.get(key)
        if e is not None:
            e.conversation = conversation

    # ---- inferred sessions ------------------------------------------------------------------------------------------
    def infer(self, cache_salt: str | None, tenant: str | None, hashes: Sequence[Hashable],
              tokens: Sequence[int] | None = None, block: int = 0, opaque: Opaque = (),
              ending: bool = False) -> SessionKey:
        """The inferred session a request without a session field joins: the newest idle one of the deepest block hash
        (scanned from the prompt's end) that anchors any session, whose turn the prompt continues; else a new one.
        `ending` (the turn ends its session): only one whose answer the prompt repeats (module docstring)."""
        self.created, self.shared_join, self.shared_repeat = None, False, False
        n = len(hashes)
        index = self.index.get(tenant) or {}
        for i in range(n - 1, max(n - 1 - INFER_SCAN_BLOCKS, -1), -1) if index else ():
            bucket = index.get(hashes[i])
            if bucket is None:
                continue
            for e in reversed(bucket):
                if e.busy or e.key.cache_salt != cache_salt or not _continues_at(e, i, hashes[i], tokens, block,
                                                                                 opaque, ending):
                    continue
                e.busy += 1
                # shared from a repeat of an answered prompt (not a retry) until a turn that extends it finishes
                repeat = repeats_last_prompt(e.anchor, e.tail, i, n, tokens, block)
                self.shared_join = e.shared = e.shared or (repeat and e.answered)
                self.shared_repeat = repeat and e.shared
                self.counters["inference_hits"] += 1
                self.counters["inferred_turns"] += 1
                return e.key
            break  # the newest turns this prompt meets are another's, or taken (a branch): a session of its own
        ids = self._ids.get(tenant) or self._ids.setdefault(tenant, itertools.count(1))
        key = SessionKey(SessionId(f"{INFERRED_PREFIX}{next(ids)}"), cache_salt, tenant, inferred=True)
        self._add(key, None)  # indexed when its turn finishes
        self.counters["inferred_sessions"] += 1
        self.counters["inferred_turns"] += 1
        return key

    # ---- turn outcomes ------------------------------------------------------------------------------------------
    def finished(self, key: SessionKey, anchor: Anchor | None, tail: Tail | None = None,
                 computed: Anchor | None = None, moved: bool = True, normal: bool = True) -> None:
        """A turn of `key` finished; `anchor` is its prompt's last full block (None: shorter than a block), `tail` its
        prompt's tokens past it, `computed` the last full block of its prompt and answer. The session's anchors move
        there, unless not `moved`: a side turn that ended last kept the session's longer pin, and the session's next
        turn continues that longer turn (as the policy expects: `RetentionPolicy.turn_finished`). Not `normal`: it was
        aborted or failed (a repeat of its prompt is a retry). The adapter forgets, not finishes, a turn of a session
        ended while it ran."""
        e = self.entries.get(key)
        if e is None:
            branches = None if key.inferred else self.branches.setdefault(
                key if key.branch == 0 else key._replace(branch=0), [])
            e = self._add(key, anchor, branches)
        else:
            self.entries.move_to_end(key)
        if e.busy:  # (never below 0)
            e.busy -= 1
        e.finished = next(self._finished)
        if not moved:
            return
        if key.inferred:
            self._unindex(e)
            longer = tail is not None and e.tail is not None and tail.length > e.tail.length
            same = anchor == e.anchor and not longer
            e.shared, e.answered = e.shared and same, normal or (e.answered and same)  # extended: they diverged
        e.anchor, e.tail = anchor, tail
        e.computed = computed if computed is not None and (anchor is None or computed[0] > anchor[0]) else None
        if key.inferred:
            index = self.index.setdefault(key.tenant, {})
            for a in (e.anchor, e.computed):
                if a is not None:
                    bucket = index.setdefault(a[1], [])
                    bucket.append(e)
                    self.indexed += 1
                    if len(bucket) > BUCKET:
                        del bucket[0]
                        self.indexed -= 1
            if not index:
                del self.index[key.tenant]
        if len(self.entries) > self.config.max_entries:  # (the usual turn: no call)
            self._trim()

    def abandoned(self, key: SessionKey) -> None:
        """A joined turn left before it ran (aborted): an inferred session can be joined again."""
        e = self.entries.get(key)
        if e is not None:
            e.busy = max(e.busy - 1, 0)

    def forget(self, key: SessionKey) -> None:
        """The session ended: its anchors and branch slot go (a turn still in flight registers it again when it
        finishes, unless the adapter forgets it then too)."""
        e = self.entries.pop(key, None)
        if e is None:
            return
        if key.inferred:
            self._unindex(e)
        else:
            base = key._replace(branch=0)
            branches = self.branches.get(base)
            if branches is not None and e in branches:
                branches.remove(e)
                if not branches:
                    del self.branches[base]

    def stats(self) -> dict[str, float]:
        c = self.counters
        return {"inferred_sessions": c["inferred_sessions"], "inferred_turns": c["inferred_turns"],
                "inference_hits": c["inference_hits"], "branches": c["branches"],
                "branch_overflows": c["branch_overflows"],
                "inference_table_entries": self.indexed}

    # ---- internals ----------------------------------------------------------------------------------------------
    def _add(self, key: SessionKey, anchor: Anchor | None, branches: list[_Entry] | None = None) -> _Entry:
        e = self.entries[key] = _Entry(key, anchor)
        e.busy = 1  # its turn is running: never forgotten by the trim below
        if branches is not None:
            branches.append(e)
        self._trim()
        return e

    def _unindex(self, e: _Entry) -> None:
        index = self.index.get(e.key.tenant)
        if index is None:
            return
        for a in (e.anchor, e.computed):
            bucket = index.get(a[1]) if a is not None else None
            if bucket is not None and e in bucket:
                bucket.remove(e)
                self.indexed -= 1
                if not bucket:
                    del index[a[1]]  # type: ignore[index]
        if not index:
            del self.index[e.key.tenant]

    def _trim(self) -> None:
        excess = len(self.entries) - self.config.max_entries
        if excess <= 0:
            return
        drop: list[SessionKey] = []
        # Bounded scan: entries with pins are skipped, and pins are bounded by the KV pool, not by traffic.
        for key, e in itertools.islice(self.entries.items(), excess + self.TRIM_SCAN):
            if len(drop) >= excess:
                break
            if not e.busy and not self.is_pinned(key):
                drop.append(key)
        for key in drop:
            self._retire(key)

    def _retire(self, key: SessionKey) -> None:
        """Forget a branch to make room (not because it ended), and never give its number to a new branch of the id:
        its record may outlive its anchor in the retention policy, and a stranger's turn given its key would inherit
        its history, or end it (found by review: after the branches were forgotten, the next non-continuing turn got
        branch 0, the victim's). Bounded like the entries; past the bound, `in_use` still guards a live record."""
        self.forget(key)
        if not key.inferred:
            base = key._replace(branch=0)
            self._retired[base] = max(self._retired.get(base, -1), key.branch)
            self._retired.move_to_end(base)
            while len(self._retired) > self.config.max_entries:
                self._retired.popitem(last=False)


def _continues_at(e: _Entry, i: int, h: Hashable, tokens: Sequence[int] | None, block: int, opaque: Opaque,
                  answer_only: bool = False) -> bool:
    """A prompt whose block `i` hashes to `h` continues `e`'s last turn: it repeats the turn's answer (the computed
    anchor), or (unless `answer_only`) its prompt's last full block and then its tail (when the tokens are known)."""
    c = e.computed
    if c is not None and c[0] == i and c[1] == h:
        return True
    if answer_only:
        return False
    a = e.anchor
    if a is None or a[0] != i or a[1] != h:
        return False
    return e.tail is None or tokens is None or not block or repeats(tokens, (i + 1) * block, e.tail, opaque)


def _depth(e: _Entry, hashes: Sequence[Hashable], tokens: Sequence[int] | None, block: int, opaque: Opaque,
           named: bool = False) -> int:
    """The index of the deepest anchor of branch `e` that a prompt (`hashes`, `tokens`) continues; -1 for a branch
    without a full block that it continues (with no tokens to compare, as before: any prompt does); -2 for none."""
    n = len(hashes)
    c = e.computed
    if c is not None and c[0] < n and hashes[c[0]] == c[1]:
        return c[0]
    a = e.anchor
    idx = -1 if a is None else a[0]
    if a is not None and (idx >= n or hashes[idx] != a[1]):
        return -2
    if e.tail is not None and tokens is not None and block and not repeats(tokens, (idx + 1) * block, e.tail,
                                                                          opaque, named):
        return -2
    return idx
