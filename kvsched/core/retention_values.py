"""How much a session's pin is worth keeping: the release order's key (lowest released first) and its inputs.

The value is `kvsched.core.scoring.value_of`, fed with the session's expected time to its next turn given how long it
has been idle (the gap model of `kvsched.core.next_use`), its role weight and its hits. A mixin of `RetentionPolicy`
(`kvsched.core.retention`), which holds the state read here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from kvsched.core.config import RetentionConfig
from kvsched.core.next_use import GapModel
from kvsched.core.retention_records import SessionRecord
from kvsched.core.scoring import Candidate, value_of
from kvsched.core.sessions import SessionKey


class ReleaseValues:
    """The retention value of a session's pin and of its KV held elsewhere (the FP8 tier)."""

    config: RetentionConfig
    clock: Callable[[], float]
    bytes_per_token: float
    sessions: Mapping[SessionKey, SessionRecord]
    gaps: GapModel

    GAP_WINDOW = 256  # gaps remembered per class (role; role and burst phase)
    MIN_TAIL_SAMPLES = 3  # gaps longer than the idle time needed to trust a class's mean residual wait

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

    def value_of(self, key: SessionKey, tokens: int, bytes_per_token: float) -> float:
        """Retention value of `tokens` of the session's KV held at `bytes_per_token` outside its pins (the FP8 tier
        orders and evicts by it): the pins' formula and next-use estimate; 0 for a session no longer tracked."""
        rec = self.sessions.get(key)
        if rec is None:
            return 0.0
        return self._value(rec, self.clock(), tokens, bytes_per_token)

    def _value(self, rec: SessionRecord, now: float, tokens: int, bytes_per_token: float) -> float:
        """`candidate`'s value for `tokens` at `bytes_per_token`, without building it (the release order keys by it)."""
        idle = max(now - rec.last_finished, 0.0) if rec.last_finished is not None else 0.0  # (0.0 is a time)
        return value_of(tokens, bytes_per_token, idle, self.expected_next_use_s(rec, idle), self.weight_of(rec),
                        rec.hits)

    def weight_of(self, rec: SessionRecord) -> float:
        """Role weight; x inferred_first_turn_weight for an inferred session nothing has continued yet (a one-shot?)."""
        w = self.config.role_weight(rec.role)
        return w * self.config.inferred_first_turn_weight if rec.key.inferred and rec.turns <= 1 else w

    def candidate(self, rec: SessionRecord, now: float) -> Candidate:
        idle = max(now - rec.last_finished, 0.0) if rec.last_finished is not None else 0.0  # (0.0 is a time)
        return Candidate(tokens=rec.pinned_tokens, bytes_per_token=self.bytes_per_token, idle_s=idle,
                         next_use_s=self.expected_next_use_s(rec, idle), role_weight=self.weight_of(rec),
                         reuse_count=rec.hits, pinned=rec.active_requests > 0)

    def score(self, rec: SessionRecord, now: float) -> float:
        """The session's retention value now (the release order's key, lowest released first). Kept on the record
        while its version, the time and the gap model's epoch stay: a decision keys the changed sessions, then scores
        the heap's top again at the same time (and the simulator's consecutive decisions often share their time)."""
        epoch = self.gaps.epoch
        if rec.scored_at == now and rec.scored_version == rec.version and rec.scored_epoch == epoch:
            return rec.scored_value
        value = self._value(rec, now, rec.pinned_tokens, self.bytes_per_token)
        rec.scored_version, rec.scored_at, rec.scored_epoch, rec.scored_value = rec.version, now, epoch, value
        return value
