"""Applies `RetentionPolicy`'s decisions to a KV block pool: the one copy the vLLM adapter
(`kvsched.adapters.vllm.session_pins`) and the simulator (`kvsched.sim.policies`) both run, so every simulator figure
stands on the code the engine runs (tests/sim/test_apply_equivalence.py replays one trace through both).

A pin is one reference held on each of a session's cached prefix blocks, per KV-cache group, in prefix order. A
release gives blocks back tail first (the head, which the next turn hits first and other sessions may share, is evicted
last); blocks released for pressure or budget are first demoted to the FP8 tier when there is one
(`kvsched.core.tier`). The pool is anything that satisfies `PinPool`, generic over its block handle: vLLM's block pool
(KVCacheBlock objects, through compat) and the simulator's numpy pool (int block ids). The pool also counts the pins'
references per block (a Counter in the engine, an array in the simulator, which stays vectorised).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from kvsched.core.retention import Decision, Pin, Release, ReleaseReason, RetentionPolicy
from kvsched.core.sessions import SessionKey, TurnHints
from kvsched.core.shared_answers import OtherAnswers
from kvsched.core.shared_tails import SharedTails
from kvsched.core.shared_turns import JoinedPins
from kvsched.core.tier import TierDirectory

B = TypeVar("B")  # a block handle
T = TypeVar("T")  # what a pass of releases returns

# Releases whose blocks go to the FP8 tier (when it is on): the session may come back. A TTL's expiry too: real sessions
# return long after any TTL (Mooncake's conversation trace: 94% of gaps over 30 s) and the tier, not the pool, is where
# they can wait (issue 24: +0.37 of OPT's saving on that trace at live 1.5x). An end means the session will not; a turn
# release drops blocks its own request did not hit.
DEMOTE_REASONS = frozenset({ReleaseReason.PRESSURE, ReleaseReason.BUDGET, ReleaseReason.TTL})
PRESSURE_CHUNK = 4  # blocks released per try when a live request is short; the allocation is retried after each

# Plan the copy of `blocks` ((content key, block id), prefix order) released by a session into the tier, the first at
# the given index of its pin (the tier lists each session's blocks in its pins' order: kvsched.core.tier_chain); returns
# the number of blocks copied (blocks the tier already held only gain an owner).
Demote = Callable[[SessionKey, list[tuple[Hashable, int]], int], int]


class PinPool(Protocol[B]):
    """What applying pins needs of a block pool (every list of blocks passed holds distinct blocks)."""

    def hold(self, blocks: list[B]) -> None:
        """Take a pin's reference on each block: the pool cannot evict it (vLLM: `BlockPool.touch`)."""

    def hold_allocated(self, blocks: list[B]) -> None:
        """Count blocks the caller has just allocated (they carry one reference) as held by a pin."""

    def give_back(self, blocks: list[B]) -> None:
        """Drop a pin's reference on each; blocks left unreferenced become evictable in this order, the first evicted
        first (vLLM: `BlockPool.free_blocks`)."""

    def num_free(self) -> int:
        """Blocks an allocation may take now: never used + evictable."""

    def num_pinned(self) -> int:
        """Distinct blocks at least one pin holds (a prefix shared by several sessions counts once)."""

    def cached_keys(self, blocks: list[B]) -> list[tuple[Hashable, int]]:
        """(content key, block id) of the blocks that are in the prefix cache, in order: what the tier stores."""


@dataclass(frozen=True, slots=True)
class Applied:
    """One decision as applied, for tests and traces: `op` pin (`blocks`: the pin's size after), release (`blocks`
    given back, `demoted` of them copied to the tier) or prefetch (`blocks` restored into the pin)."""

    op: str
    session: str
    reason: str = ""
    blocks: int = 0
    demoted: int = 0


def split_exact(blocks: int, sizes: list[int]) -> list[int]:
    """`blocks` (at most sum(sizes)) shared out in proportion to `sizes` by largest remainder (Hamilton's method): the
    parts sum to exactly `blocks` and none exceeds its size. Found by review: a ceiling per group released more than
    `blocks` from a pin of two groups, and the policy's count of the pin's blocks drifted above what it held."""
    total = sum(sizes)
    parts = [blocks * n // total for n in sizes]
    left = blocks - sum(parts)  # fewer than the groups with a remainder: each of them gets one at most
    if left:
        for i in sorted(range(len(sizes)), key=lambda i: -(blocks * sizes[i] % total))[:left]:
            parts[i] += 1
    return parts


class PinApplier(Generic[B]):
    """The blocks each session's pin holds, and the calls that change them. Every decision the policy returns must be
    applied here (the policy already counted it)."""

    def __init__(self, policy: RetentionPolicy, pool: PinPool[B], block_size: int) -> None:
        self.policy = policy
        self.pool = pool
        self.block_size = block_size
        self.pinned: dict[SessionKey, list[list[B]]] = {}  # per KV-cache group, in prefix order
        self.joined = JoinedPins(policy.config.shared_pin_answers)  # sessions whose pin holds several answers
        self.tails = SharedTails(self.joined.cap)  # ... and the tier's partial last blocks of their answers
        self.others = OtherAnswers()  # ... and the answers a turn continuing one of them leaves to their users
        self.directory: TierDirectory | None = None
        self.demote: Demote | None = None
        self.on_dropped: Callable[[SessionKey], None] | None = None  # a session's whole pin went
        # Observers: called with every batch of decisions before it is applied (the engine's KVSCHED_TRACE), and a
        # list that records each decision as applied (tests).
        self.before_apply: Callable[[Sequence[Decision], dict[SessionKey, list[list[B]]] | None], None] | None = None
        self.log: list[Applied] | None = None

    def attach_tier(self, directory: TierDirectory, demote: Demote) -> None:
        """Demote pressure and budget releases through `demote`; `directory` orders its evictions by `tier_value`."""
        directory.value_of = self.tier_value
        self.directory, self.demote = directory, demote
        if directory.num_slots > 0:  # the pins' payback ledger starts from its tier start
            self.policy.payback.tier_attached()

    # ---- events (the adapters' hooks call these) ----------------------------------------------------------------
    def turn_started(self, key: SessionKey, cached_tokens: int, prompt_keys: Iterable[Hashable] | None = None,
                     hittable: int | None = None) -> None:
        """The session's request was scheduled with `cached_tokens` from the cache; `prompt_keys`, its prompt's full
        block keys in prefix order (vLLM's block hashes, the trace's ids), feed the pins' payback tracker."""
        if prompt_keys is not None and self.policy.payback.enabled:
            self.apply(self.policy.prompt_seen(prompt_keys, cached_tokens // self.block_size, hittable))
        self.apply(self.policy.turn_started(key, cached_tokens))

    def turn_finished(self, key: SessionKey, hints: TurnHints, groups: list[list[B]], tokens: int,
                      cached_keys: Iterable[Hashable] | None = None) -> None:
        """A turn ended holding `groups` (per KV-cache group, the reusable prefix's blocks covering `tokens` tokens):
        pin them; a session's last turn also drops its tier blocks. `cached_keys`: the blocks' keys (prefix order),
        which a plain LRU pool would now hold too (the payback tracker's ghost). A turn that repeated a shared
        session's last prompt pins them beside the other user's answer (`kvsched.core.shared_turns.JoinedPins`)."""
        if cached_keys is not None and self.policy.payback.enabled:
            self.policy.payback.cached(cached_keys)
        rec = self.policy.sessions.get(key)
        joined = rec is not None and rec.joins_pin and not hints.end
        other = True  # its answer is not one the pin holds (as far as the pin tells)
        if joined and rec is not None:
            groups, tokens, other = self.joined.join(key, self.pinned.get(key), groups, tokens, rec.pinned_tokens,
                                                     self.block_size, self.policy.budget_blocks, self.pool.cached_keys)
        # A group shorter than another starts past block 0 (a sliding window: the blocks a hit at the prefix's end
        # needs): without its tail, no hit can use the rest of the pin, so the pin is released whole or not at all.
        whole_only = len(groups) > 1 and min(map(len, groups)) < max(map(len, groups))  # (one group: no list made)
        split = None  # a turn continuing one answer of a union pin: the others stay pinned beside (`shared_answers`)
        if rec is not None and rec.union_pin and not joined:
            split = self.others.split(self.joined, rec, self.pinned.get(key), groups, self.pool.cached_keys)
        decisions = self.policy.turn_finished(key, hints, tokens, sum(map(len, groups)), whole_only)
        kept = None
        if split is not None and rec is not None and not rec.kept_over:
            pins, kept = self.others.keep(self.policy, *split, self.block_size)
            self.apply(pins, kept)
        self.apply(decisions, {key: groups})
        if kept is not None and self.directory is not None:  # their partial last blocks stay with them
            to, held = kept.popitem()
            parents = {k for k, _ in self.pool.cached_keys(held[0])} - {k for k, _ in self.pool.cached_keys(groups[0])}
            self.tails.hand_over(self.directory, key, to, parents)
        if self.others.chains:  # a user back on an answer a companion kept: it leaves the companion
            self._answers_returned(groups)
        if rec is not None and (joined or rec.union_pin) and not rec.kept_over:  # (a side turn left the pin as it was)
            rec.union_pin = joined and key in self.joined and key in self.pinned
            if not rec.union_pin:
                self.joined.forget(key)
        if hints.end:
            self.drop_tier(key)
        elif self.directory is not None and (joined or key in self.tails.kept):  # before the turn's tail is saved
            self.tails.turn_finished(self.directory, key, joined, other)

    def _answers_returned(self, groups: list[list[B]]) -> None:
        """A finished turn holds whole answers companions keep (`kvsched.core.shared_answers`): they leave them, with
        their partial last blocks in the tier; a companion keeping none ends (its tier blocks go too: the user's own
        session holds the answer now)."""
        keys = self.pool.cached_keys
        for to, back in self.others.returned([keys(g) for g in groups]).items():
            decisions, pending = self.others.leave(self.policy, to, back, self.pinned.get(to, []), keys,
                                                   self.block_size)
            self.apply(decisions, pending)
            left = self.pinned.get(to)
            if left:
                if self.directory is not None:
                    self.tails.keep_after(self.directory, to, {k for k, _ in keys(left[0])})
            else:  # it ended: its tier blocks (demoted by an earlier pressure release) and tails go, as an end's
                self.drop_tier(to)

    def drop_tier(self, key: SessionKey) -> None:
        """The session ended: its tier blocks and tails go, the tails kept beside its own too (`SharedTails`)."""
        if self.directory is not None:
            self.directory.drop_owner(key)
            self.tails.release(self.directory, key)

    def enforce_budget(self) -> None:
        """Release pins past the pin budget (never, with the default budget: the whole pool), down to the policy's
        low-water mark, in one pass: each release is applied as it is decided and counted by the distinct blocks it
        freed (a pin's shared head frees nothing while another pin holds it)."""
        pool = self.pool
        pinned = pool.num_pinned()
        if pinned <= self.policy.budget_blocks:  # the usual case: no closure, no call
            return

        counted = [pinned]  # the distinct pinned blocks after the last release (one pool call per release)
        observed = self.before_apply is not None or self.log is not None
        demote = self.demote is not None

        def applied(release: Release) -> int:
            if observed:
                self.apply((release,))
            else:  # no observer: straight to the blocks
                self.unpin(release.key, release.blocks, demote and release.reason in DEMOTE_REASONS)
            before, counted[0] = counted[0], pool.num_pinned()
            return before - counted[0]

        self._releasing(ReleaseReason.BUDGET, lambda: self.policy.release_over_budget(pinned, applied))

    def _releasing(self, reason: ReleaseReason, releases: Callable[[], T]) -> T:
        """`releases()`, a pass that only releases pins for `reason`: when each release is demoted to the tier before
        its blocks are given back, the tier keeps the pool's answers through the pass (`tier_reach`)."""
        d = self.directory
        if d is None or self.demote is None or reason not in DEMOTE_REASONS:
            return releases()
        return d.reach.batch(releases)

    def expire(self) -> None:
        heap = self.policy.expiry.heap  # called at every event (the replay) or step (the engine): nothing due, no call
        if self.pinned and heap and heap[0][0] <= self.policy.clock():
            self._releasing(ReleaseReason.TTL, lambda: self.apply(self.policy.expire()))

    def on_shortage(self, own: SessionKey | None, num_new_tokens: int, own_free_hits: int = 0) -> bool:
        """A live request (of session `own`) could not be allocated `num_new_tokens` new tokens' blocks
        (`own_free_hits`: its prefix-cache hits that sit in the free queue: they count as free but the request takes
        them). Release pins, lowest value first; True if blocks were freed (the allocation is then retried)."""
        pool = self.pool
        before = pool.num_free()
        # Nothing, if releasing every pin could not free the blocks it lacks at least (its new tokens may start
        # inside its last block: one less). Found by review: a waiting request too large to fit beside the running
        # ones released every pin at each step it was tried (vLLM's queue and the simulator's wait behind it), so the
        # pool kept none while it waited; its admission, when it fits, releases the lowest-value pins it needs.
        short = -(-num_new_tokens // self.block_size) - 1 + own_free_hits - before
        if short > 0 and short > self.policy.pressure_bound(own):
            return False
        # About the shortfall, not the request's whole size: free blocks still count (released pins stay cached in
        # the free queue only until reused, and the order past the shortfall may change before they are needed, e.g.
        # when a released session's next turn arrives). If it was not enough, the caller fails again and comes back.
        need = max(PRESSURE_CHUNK, -(-num_new_tokens // self.block_size) + 1 + own_free_hits - before)
        return self._releasing(ReleaseReason.PRESSURE, lambda: self._release_for(own, need, before))

    def _release_for(self, own: SessionKey | None, need: int, before: int) -> bool:
        """`on_shortage`'s releases, until the pool has more than `before` free blocks; False if none was left."""
        pool, exclude = self.pool, ((own,) if own is not None else ())
        while True:
            # Other sessions first (idle ones, then those with a request running and a pin beyond it, then those
            # with one queued). The request's own session last (even while it runs): releasing it frees nothing the
            # request will hit (hit blocks are taken back out of the free queue), but keeping it when nothing else is
            # left would leave a request waiting on its own session's pin forever.
            releases = (self.policy.release_for_pressure(need, exclude=exclude) or self.policy.release_for_pressure(need)
                        or (self.policy.release_running_pin(own) if own is not None else []))
            if not releases:
                return False
            self.apply(releases)
            if pool.num_free() > before:
                return True  # pins that freed nothing (shared blocks) don't count

    def make_room(self, blocks: int, exclude: SessionKey) -> None:
        """Release idle sessions' pins, lowest value first, until `blocks` more blocks are free. Sessions with a request
        queued or running keep theirs (in a fan-out burst every arrival's prefetch would otherwise evict the next's)."""
        if blocks <= 0:
            return
        self._releasing(ReleaseReason.PRESSURE, lambda: self._release_idle(self.pool.num_free() + blocks, exclude))

    def _release_idle(self, target: int, exclude: SessionKey) -> None:
        pool = self.pool
        while pool.num_free() < target:  # the release order puts sessions with a request in flight after idle ones
            releases = self.policy.release_for_pressure(target - pool.num_free(), exclude=(exclude,), idle_only=True)
            if not releases:
                return
            self.apply(releases)

    def adopt(self, key: SessionKey, head: list[B], new: list[B]) -> bool:
        """The session's pin becomes `head` (cached blocks) followed by `new` (blocks restored from the tier ahead of
        its turn, which come with the one reference their allocation took). The caller holds `head` while it allocates
        `new`, so none of it is among them (blocks of a head in the free queue are the first an allocation takes).
        False if the policy refused them (over the budget): `new` is given back."""
        n = len(head) + len(new)
        if not self.policy.prefetched(key, n * self.block_size, n):
            self.pool.give_back(new[::-1])
            return False
        self.repin(key, [head])
        self.pinned[key][0].extend(new)
        self.joined.forget(key)  # (a pin that is a prefix of one request's: no union; `SessionRecord.union_pin` too)
        if (rec := self.policy.sessions.get(key)) is not None:
            rec.union_pin = False
        self.pool.hold_allocated(new)
        if self.log is not None:
            self.log.append(Applied("prefetch", str(key.session_id), blocks=len(new)))
        return True

    # ---- decisions ----------------------------------------------------------------------------------------------
    def apply(self, decisions: Sequence[Decision], pending: dict[SessionKey, list[list[B]]] | None = None) -> None:
        """Apply the policy's decisions in order; a Pin takes the session's blocks from `pending`."""
        if self.before_apply is not None:
            self.before_apply(decisions, pending)
        log = self.log
        for d in decisions:
            if isinstance(d, Pin):
                self.repin(d.key, pending.get(d.key, []) if pending else [])
                if log is not None:
                    log.append(Applied("pin", str(d.key.session_id), blocks=sum(map(len, self.pinned[d.key]))))
            else:
                released, demoted = self.unpin(d.key, d.blocks, self.demote is not None and d.reason in DEMOTE_REASONS)
                if log is not None:
                    log.append(Applied("release", str(d.key.session_id), d.reason.value, released, demoted))

    def repin(self, key: SessionKey, groups: list[list[B]]) -> None:
        """Make `groups` the session's pin, holding only blocks it did not hold and giving back only those it drops
        (a session's next turn usually extends its prefix, so this is O(new blocks), not O(history)). A group may
        start past block 0 (a sliding window: the blocks a hit at the prefix's end needs): blocks at one index are at
        one position while the windows start together; once the window slid nothing is common, and the new window is
        held before the old one is given back (a block in both never reaches the free queue)."""
        old = self.pinned.get(key)
        if old is not None and len(old) != len(groups):
            self.unpin(key)
            old = None
        if old is None:
            old = [[] for _ in groups]
        added: list[B] = []
        dropped: list[B] = []
        for old_g, new_g in zip(old, groups, strict=True):
            n = len(old_g)
            if len(new_g) >= n and (new_g if len(new_g) == n else new_g[:n]) == old_g:  # identity-first, in C
                common = n
            else:
                common = 0
                for a, b in zip(old_g, new_g, strict=False):
                    if a is not b and a != b:
                        break
                    common += 1
                dropped.extend(reversed(old_g[common:]))
                del old_g[common:]
            tail = new_g[common:]
            added.extend(tail)
            # Extended in place: the pin's list is long-lived, and a fresh copy per turn would be young garbage-
            # collector work (every young list of block refs is traversed until it is promoted).
            old_g.extend(tail)
        if added:
            self.pool.hold(added)
        self.pinned[key] = old
        if dropped:
            self.pool.give_back(dropped)

    def unpin(self, key: SessionKey, blocks: int | None = None, demote: bool = False) -> tuple[int, int]:
        """Release the session's whole pin (`blocks` None) or its last `blocks` blocks (each KV-cache group's tail, in
        proportion, exactly `blocks` in all: the policy counted that many), demoting them to the tier first if
        `demote`. Returns (blocks given back, blocks demoted)."""
        groups = self.pinned.get(key)
        if not groups:
            self.pinned.pop(key, None)
            return 0, 0
        total = sum(map(len, groups))
        released: list[B] = []
        start = 0  # where the released run starts in the pin (the tier's one group: the first)
        if blocks is None or blocks >= total:
            del self.pinned[key]
            if self.joined.answers:  # (rarely any: a call saved per release)
                self.joined.forget(key)
            if self.others.chains:
                self.others.forget(key)
            if len(groups) == 1:  # one KV-cache group: its copy, reversed (a slice, in C)
                released = groups[0][::-1]
            else:
                for g in groups:
                    released.extend(reversed(g))
            if self.on_dropped is not None:
                self.on_dropped(key)
        elif len(groups) == 1:  # one group: its tail, in place (the pin's list is long-lived)
            g = groups[0]
            cut = len(g) - max(blocks, 0)
            released = g[cut:]
            released.reverse()
            del g[cut:]
            start = cut
        else:  # in place (the pin's lists are long-lived)
            for g, n in zip(groups, split_exact(blocks, [len(g) for g in groups]), strict=True):
                if n:
                    released.extend(reversed(g[len(g) - n:]))
                    del g[len(g) - n:]
            start = len(groups[0])
        demoted = 0
        if demote and self.demote is not None:  # copied to the tier before the pool can reuse them, prefix order
            demoted = self.demote(key, self.pool.cached_keys(released[::-1]), start)
        # Tail blocks first: they are evicted before the session's head (which other sessions may share).
        self.pool.give_back(released)
        return len(released), demoted

    def tier_value(self, key: Hashable) -> float:
        """Retention value of a session's tier blocks and tail: the pins' formula at the tier's bytes per token."""
        d = self.directory
        if d is None or not isinstance(key, SessionKey):
            return 0.0
        bs = self.block_size
        return self.policy.value_of(key, d.blocks_of(key) * bs + d.tail_tokens(key), d.block_bytes / bs)
