"""How much a session's pin is worth keeping: the release order's key (lowest released first) and its inputs.

The value is `kvsched.core.scoring.value_of`, fed with the session's expected time to its next turn given how long it
has been idle (the gap model of `kvsched.core.next_use`), its role weight and its hits. A mixin of `RetentionPolicy`
(`kvsched.core.retention`), which holds the state read here.

A first turn's chance of a return is learned, not Laplace's 1/2: the gap model holds only the gaps of sessions that
came back, so a fresh first turn (idle 0) was credited with all of them, quick ones included, while a conversation
idle past the quick gaps was left with the long ones; where most first turns never return (Mooncake conversation:
69% of sessions are single-turn) a one-shot's pin outranked a live conversation's after under a second of idle
(stop 49; tests/core/test_retention_first_turns.py). Its weight carries the share of first turns of its size class
that came back within the horizon (`kvsched.core.return_model`, shrunk to the turn index's), over the formula's
Laplace term, so the kernels' formula is unchanged. A later turn's weight carries its class's share too (turn index,
size octave, the gap before it), over the Laplace term on the session's own hits, which stays: a burst that hit four
times in a row (p 5/6), large (attention raises the recompute cost per byte), otherwise outranked the smaller sessions
that come back, where bursts of its class end there, and its pin, held for its TTL, cost more prefill than LRU
(tools/adversarial a2_honest and d_huge_plus_small; stop 52, tests/core/test_retention_later_turns.py). Replacing the
Laplace term there too, as for first turns, cost the generated fleet 0.0007 of OPT's saving (below its gate).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from kvsched.core.config import RetentionConfig
from kvsched.core.native_base import Weakrefable
from kvsched.core.next_use import GapModel
from kvsched.core.retention_records import SessionRecord
from kvsched.core.return_model import ReturnModel, return_class
from kvsched.core.scoring import Candidate, value_of
from kvsched.core.sessions import SessionKey


class ReleaseValues(Weakrefable):
    """The retention value of a session's pin and of its KV held elsewhere (the FP8 tier)."""

    config: RetentionConfig
    clock: Callable[[], float]
    bytes_per_token: float
    sessions: OrderedDict[SessionKey, SessionRecord]
    gaps: GapModel
    returns: ReturnModel

    GAP_WINDOW: Final = 256  # gaps remembered per class (role; role and burst phase)
    MIN_TAIL_SAMPLES: Final = 3  # gaps longer than the idle time needed to trust a class's mean residual wait

    def expected_next_use_s(self, rec: SessionRecord, idle_s: float) -> float:
        """Expected seconds from the session's last finished turn to its next one, given it has been idle `idle_s`.

        idle + the mean residual wait of the recent gaps longer than `idle_s` that followed turns of the same role at
        the same burst phase, else of the role (`kvsched.core.next_use.GapModel`): a worker that just ended its round
        waits like the workers that ended theirs, not like one between two tool calls. Without enough of those: the
        session's own expected gap while it is not yet overdue, and past it twice the idle time (a wait that has
        lasted t is expected to last about as long again: the median estimate for a duration of unknown scale,
        J. R. Gott, Nature 363, 1993), so a session that is not coming back sinks in the order until its TTL releases
        it. The result is never below `idle_s`: the formula's "overdue" decay does not apply, the estimate already
        holds what the idle time says."""
        residual = self.gaps.mean_residual(rec.role, rec.burst_turns, idle_s)
        if residual is None:
            residual = max(rec.expected_gap_s - idle_s, idle_s)
        return idle_s + residual

    def pin_next_use_s(self, rec: SessionRecord, idle_s: float) -> float:
        """`expected_next_use_s` for the session's pin: at least the session's own expected gap when that is past
        the pin's TTL (it has come back later than its pin lasts: the pin lapses before the return it is held for,
        which its class's quicker gaps do not say). tools/adversarial d_huge_plus_small: a 1,500-block session back
        every ~34 s, pinned for 30 s, outranked the small sessions (attention's term), 1.03x LRU's prefill at 1.5x,
        0.89x with this rule. Not for the FP8 tier's order (`value_of`): the tier is where such sessions wait."""
        expected = self.expected_next_use_s(rec, idle_s)
        return max(expected, rec.expected_gap_s) if rec.gaps_seen and rec.expected_gap_s > rec.ttl_s else expected

    def value_of(self, key: SessionKey, tokens: int, bytes_per_token: float) -> float:
        """Retention value of `tokens` of the session's KV held at `bytes_per_token` outside its pins (the FP8 tier
        orders and evicts by it): the pins' formula and next-use estimate; 0 for a session no longer tracked."""
        rec = self.sessions.get(key)
        if rec is None:
            return 0.0
        return self._value(rec, self.clock(), tokens, bytes_per_token, pin=False)

    def _value(self, rec: SessionRecord, now: float, tokens: int, bytes_per_token: float, pin: bool = True) -> float:
        """`candidate`'s value for `tokens` at `bytes_per_token`, without building it (the release order keys by it);
        `pin` False: of KV held outside its pin (the tier), whose wait the pin's TTL does not bound."""
        idle = max(now - rec.last_finished, 0.0) if rec.last_finished is not None else 0.0  # (0.0 is a time)
        next_use = self.pin_next_use_s(rec, idle) if pin else self.expected_next_use_s(rec, idle)
        return value_of(tokens, bytes_per_token, idle, next_use, self.weight_of(rec), rec.hits)

    def weight_of(self, rec: SessionRecord) -> float:
        """Role weight x its turn's class's learned return share; for a first turn over Laplace's term for its hits
        (the formula's p_reuse becomes the learned share: 1 while nothing is learned, the model's prior being 1/2;
        a later turn's is x 1/2 then, a factor common to all later turns). An
        inferred session's first turn has a class of its own, whose share starts at inferred_first_turn_weight x the
        first turns' (a one-shot?) and becomes its own as its outcomes are learned: not that factor x a share already
        learned from those same turns (the discount twice; BENCHMARKS.md, "inferred first turns")."""
        w = self.config.role_weight(rec.role)
        if rec.turns > 1:  # x its class's learned share; the formula's Laplace term on the session's own hits stays
            return w * self.returns.estimate(return_class(rec.turns, rec.pinned_blocks, rec.last_gap_s), 1.0)
        learned = self.returns.estimate(return_class(1, rec.pinned_blocks, None, rec.key.inferred))
        return w * learned * (rec.hits + 2.0) / (rec.hits + 1.0)

    def candidate(self, rec: SessionRecord, now: float) -> Candidate:
        idle = max(now - rec.last_finished, 0.0) if rec.last_finished is not None else 0.0  # (0.0 is a time)
        return Candidate(tokens=rec.pinned_tokens, bytes_per_token=self.bytes_per_token, idle_s=idle,
                         next_use_s=self.pin_next_use_s(rec, idle), role_weight=self.weight_of(rec),
                         reuse_count=rec.hits, pinned=rec.active_requests > 0)

    def score(self, rec: SessionRecord, now: float) -> float:
        """The session's retention value now (the release order's key, lowest released first). Kept on the record
        while its version, the time and the gap model's epoch stay: a decision keys the changed sessions, then scores
        the heap's top again at the same time (and the simulator's consecutive decisions often share their time)."""
        epoch = self.gaps.epoch + self.returns.total.outcomes  # either model learning something changes values
        if rec.scored_at == now and rec.scored_version == rec.version and rec.scored_epoch == epoch:
            return rec.scored_value
        value = self._value(rec, now, rec.pinned_tokens, self.bytes_per_token)
        rec.scored_version, rec.scored_at, rec.scored_epoch, rec.scored_value = rec.version, now, epoch, value
        return value
