"""The answers of a shared inferred session's union pin that the turn continuing one of them did not continue.

Several users sent one first prompt and each got another answer: the session's pin holds them all
(`kvsched.core.shared_turns.JoinedPins`). The first user's next turn joins the session, continues that user's answer,
and its finish makes its own chain the session's pin. Before, that dropped the other answers' blocks at once (given
back uncounted, not demoted to the tier), though their users had not been gone longer than the pin lasts: the second
user's next turn, a session of its own by then (`kvsched.core.lineage`: the session's anchors moved to the first
user's turn), recomputed its answer after any pressure (found by review). An operator expects each user's next turn
to find its own answer, and an answer nobody came back for to go as any unreturned pin goes.

So the answers not continued stay pinned under a companion session of their own (`companion_key`), holding each of
their chains whole, the shared prompt's blocks included (an answer's blocks without the blocks before them could
never be hit: a prefix-cache hit runs from block 0). The companion inherits the union's history, so it expires when
the union would have (the last joined turn's finish plus its TTL), with a TTL release that demotes it to the FP8 tier,
and the release order values it as it valued the union. A user who comes back hits its answer from it; its own turn
then pins its own chain, and that answer leaves the companion at the turn's finish (`returned`, `leave`), which ends
when it keeps none. Found by review: the companion held the answer on until the union's TTL, a session record counted
in the release order and the budget for blocks the user's own pin held, and after that pin's release (its TTL, its
end) kept them pinned longer than the user's own session would. Whether the user's own turn pinned them is its
session's business: the companion kept them for a user who had not come back.

Order: a pin of several answers cannot be one prefix in position order (two blocks sit at each position past the
prompt). The companion's is the union pin's order filtered: the shared prompt, then each answer's own blocks in the
order they were pinned (the order the answers came), each answer's blocks a prefix of its chain in position order
(`JoinedPins.join` appends an answer's blocks that the pin lacks, in position order, after the others; a block's
parent is in the pin before it). All that reads the order takes the tail first: a pressure or budget release, the
pool's free order (`PinApplier.unpin`), the tier's demotion run and its eviction. So what any release leaves of each
answer is a prefix of its chain: never a hole (a block given back while a later block of its answer stays pinned,
useless: a hit runs from block 0). The newest answer goes first, whole, before an older one loses a block: nothing
tells the users apart but the order they asked in, and at one expected gap after each ask the newest answer's user
is the last due (the pins' value order by time to next use; the cap's oldest-first bounds how many distinct answers
a popular prompt pins, it values nothing). Interleaving the answers by position would cost each user a block where
this costs one user its answer: the same tokens. tests/core/test_shared_answers_order.py; on vLLM's pool, the
block-pool invariants (tests/adapters/vllm/pool_invariants.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Hashable
from typing import TypeVar

from kvsched.core.retention import Decision, Pin, ReleaseReason, RetentionPolicy
from kvsched.core.retention_records import SessionRecord
from kvsched.core.sessions import SessionKey
from kvsched.core.shared_turns import JoinedPins

__all__ = ["OtherAnswers", "companion_key"]

B = TypeVar("B")
Keys = Callable[[list[B]], list[tuple[Hashable, int]]]
Chains = list[list[frozenset[Hashable]]]  # answers' chains, per KV-cache group their blocks' content keys
Mark = tuple[int, Hashable]


def companion_key(key: SessionKey, n: int) -> SessionKey:
    """The companion of `key` numbered `n` (>= 1): a negative branch, which neither lineage (branches count from 0) nor
    a client (ids are validated strings; branches are the engine's) ever produces. Listed as a branch of the id."""
    return key._replace(branch=-n)


class OtherAnswers:
    """Splits a union pin's other answers off to companion sessions, one per continued union."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        # Per companion pinning, the answers it keeps: each chain, with a (KV-cache group, content key) of it that the
        # continuing turn did not hold (a turn holds the answer whole only if it holds that key: a finish looks up its
        # own keys only, and the prompt every turn of the session holds marks nothing)
        self.chains: dict[SessionKey, list[tuple[list[frozenset[Hashable]], Mark]]] = {}
        self._marks: dict[Mark, set[SessionKey]] = {}

    def split(self, joined: JoinedPins, rec: SessionRecord, old: list[list[B]] | None, groups: list[list[B]],
              keys: Keys[B]) -> tuple[SessionRecord, list[list[B]], Chains, list[frozenset[Hashable]]] | None:
        """Before the policy hears that the session's turn ended with `groups` (it continued one answer of the union
        pin `old`, or none): a copy of the session's record as the union left it, and per KV-cache group the pin's
        blocks of every answer chain `groups` does not hold whole (the pin's order: each chain after its prompt), those
        answers' chains and the turn's keys per group (`keep`). None when there are none beyond `groups`, or no content
        to compare."""
        chains = joined.answers.get(rec.key)
        if not chains or not old or len(old) != len(groups):
            return None
        new = [frozenset(k for k, _ in keys(g)) for g in groups]
        others = [c for c in chains if not all(c[i] <= new[i] for i in range(len(groups)))]
        out: list[list[B]] = []
        beyond = False  # a block of theirs the turn's chain does not hold
        for i, held in enumerate(old):
            pairs = keys(held)
            if len(pairs) != len(held):
                return None
            keep = frozenset().union(*(c[i] for c in others))
            out.append([b for b, (k, _) in zip(held, pairs, strict=True) if k in keep])
            beyond = beyond or any(k in keep and k not in new[i] for k, _ in pairs)
        return (dataclasses.replace(rec), out, others, new) if beyond else None

    def keep(self, policy: RetentionPolicy, union: SessionRecord, groups: list[list[B]], chains: Chains,
             turn: list[frozenset[Hashable]], block_size: int
             ) -> tuple[list[Decision], dict[SessionKey, list[list[B]]]]:
        """Pin `groups` under a new companion of the session whose union record was `union` (`split`): the decision
        and the blocks to apply. The record is the policy's own (`_new_record`: its activity order, which the owner
        index reads, and its table bound), given the union's history and expiry."""
        key = companion_key(union.key, next(self._ids))
        rec = policy._new_record(key)
        rec.role, rec.ttl_s, rec.turns, rec.hits = union.role, union.ttl_s, union.turns, union.hits
        rec.last_finished, rec.last_gap_s, rec.burst_turns = union.last_finished, union.last_gap_s, union.burst_turns
        rec.expected_gap_s, rec.gaps_seen = union.expected_gap_s, union.gaps_seen
        longest = max(map(len, groups))
        rec.pinned_blocks, rec.pinned_tokens = sum(map(len, groups)), longest * block_size
        rec.whole_only = len(groups) > 1 and min(map(len, groups)) < longest
        policy.pinned_blocks_total += rec.pinned_blocks
        policy.counters["shared_answers_kept"] += 1
        policy.expiry.queue(rec)
        policy.index.changed(rec)
        marked = [(c, next((i, k) for i, g in enumerate(c) for k in g if k not in turn[i])) for c in chains]
        self._mark(key, marked)  # (each has a key the turn does not hold: `split` kept only those)
        return [Pin(key)], {key: groups}

    def returned(self, turn: list[list[tuple[Hashable, int]]]) -> dict[SessionKey, list[int]]:
        """A turn finished holding blocks of content keys `turn` (per KV-cache group): per companion keeping an answer
        the turn holds whole, the indexes of those answers. Nothing looked up while no companion pins."""
        if not self.chains:
            return {}
        found = {c for i, pairs in enumerate(turn) for k, _ in pairs for c in self._marks.get((i, k), ())}
        if not found:
            return {}
        held = [frozenset(k for k, _ in pairs) for pairs in turn]
        out = {}
        for to in found:
            back = [n for n, (c, _) in enumerate(self.chains[to])
                    if len(c) == len(held) and all(g <= held[i] for i, g in enumerate(c))]
            if back:
                out[to] = back
        return out

    def leave(self, policy: RetentionPolicy, to: SessionKey, back: list[int], held: list[list[B]], keys: Keys[B],
              block_size: int) -> tuple[list[Decision], dict[SessionKey, list[list[B]]] | None]:
        """The answers `back` (`returned`) leave companion `to`, whose pin holds `held`: the decisions and the blocks
        to apply. None left: its pin goes (a turn release: the returned user's own session holds the blocks, or let
        them go) and its record with it, as an ended session's."""
        rec = policy.sessions.get(to)
        left = [m for n, m in enumerate(self.chains.get(to, ())) if n not in back]
        policy.counters["shared_answers_returned"] += len(back)
        groups: list[list[B]] = []
        pairs = [keys(g) for g in held] if left else []
        if pairs and all(len(p) == len(g) for g, p in zip(held, pairs, strict=True)):  # else no content: all go
            groups = [[b for b, (k, _) in zip(g, p, strict=True) if any(k in c[i] for c, _ in left)]
                      for i, (g, p) in enumerate(zip(held, pairs, strict=True))]
        self.forget(to)
        if rec is None:
            return [], None
        if not any(groups):
            out: list[Decision] = [policy._release(rec, ReleaseReason.TURN)] if rec.pinned else []
            policy.index.changed(rec)
            del policy.sessions[to]
            return out, None
        self._mark(to, left)
        blocks = sum(map(len, groups))
        policy.pinned_blocks_total += blocks - rec.pinned_blocks
        rec.pinned_blocks, rec.pinned_tokens = blocks, max(map(len, groups)) * block_size
        rec.whole_only = len(groups) > 1 and min(map(len, groups)) < max(map(len, groups))
        policy.index.changed(rec)
        return [Pin(to)], {to: groups}

    def forget(self, key: SessionKey) -> None:
        """`key` pins nothing of its answers now (its TTL, pressure, its end, `leave`)."""
        for _, mark in self.chains.pop(key, ()):
            keys = self._marks.get(mark)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._marks[mark]

    def _mark(self, key: SessionKey, marked: list[tuple[list[frozenset[Hashable]], Mark]]) -> None:
        self.chains[key] = marked
        for _, mark in marked:
            self._marks.setdefault(mark, set()).add(key)
