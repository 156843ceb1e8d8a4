"""What the retention policy decides and remembers: its decisions (Pin, Release and their reasons), the per-session
record it keeps, and the read-only view of it for the API and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kvsched.core.sessions import SessionKey


class ReleaseReason(StrEnum):
    TURN = "turn"  # the session's next turn started: its request now holds the blocks itself
    TTL = "ttl"
    END = "end"
    PRESSURE = "pressure"  # a live request needed the blocks
    BUDGET = "budget"  # pins exceeded the pin budget
    PAYBACK = "payback"  # pins were not paying against a plain LRU pool: suspended (kvsched.core.pin_payback)
    RESET = "reset"  # the engine's prefix cache was reset (new weights): the session goes on, its KV does not


# The policy's counter names per reason (whole releases, partial ones, blocks released, blocks of queued sessions),
# formatted once: a release happens several times per engine step.
RELEASE_COUNTERS = {r: (f"released_{r.value}", f"released_{r.value}_partial", f"released_blocks_{r.value}",
                        f"released_blocks_{r.value}_waiting") for r in ReleaseReason}


@dataclass(frozen=True, slots=True)
class Pin:
    key: SessionKey


@dataclass(frozen=True, slots=True)
class Release:
    """Drop the session's pin: all of it (`blocks` None), or only its last `blocks` blocks (the tail goes first;
    the head, which the next turn will hit first and which other sessions may share, stays)."""

    key: SessionKey
    reason: ReleaseReason
    blocks: int | None = None


Decision = Pin | Release


@dataclass(slots=True)
class SessionRecord:
    key: SessionKey
    role: str | None = None
    ttl_s: float = 0.0
    turns: int = 0
    active_requests: int = 0
    waiting: int = 0  # requests that arrived and are not scheduled yet
    waiting_since: float | None = None  # arrival of the oldest of them
    last_finished: float | None = None
    last_gap_s: float | None = None  # from the turn before its last to its last turn's end (None: one turn so far)
    expected_gap_s: float = 0.0
    gaps_seen: int = 0
    burst_turns: int = 0  # turns finished since its current burst began (`kvsched.core.next_use`)
    pinned_blocks: int = 0
    pinned_tokens: int = 0
    pin_overlapped: bool = False  # another turn of the session was still running when the pin was made or kept
    kept_over: bool = False  # its last finished turn left the session's longer pin in place (they overlapped)
    # Its turn in flight repeated the last prompt of an inferred session two users share: it keeps the other user's
    # answer pinned beside its own (`kvsched.core.shared_turns.JoinedPins`). Set at every arrival.
    joins_pin: bool = False
    # Its pin holds several users' answers (`kvsched.core.shared_turns.JoinedPins`): a turn continuing one of them
    # hit one answer, not the pin's head, so its start releases nothing (its finish makes its chain the pin).
    union_pin: bool = False
    # The pin may hold blocks no running request of the session holds: made or kept while another request of it ran,
    # or grown by a prefetch. Cleared when a turn starts (the pin is cut to what that request hit).
    pin_beyond_running: bool = False
    releasable: int = 0  # its pinned blocks as counted in the release index's `releasable_blocks`
    hits: int = 0
    hit_tokens: int = 0
    prefetched_tokens: int = 0  # the pin's last tokens, restored from the FP8 tier ahead of the next turn
    expiry_queued: float | None = None  # earliest time of this session's entries in the policy's expiry heap
    activity: int = 0  # when it was last active, as a sequence number: the release order's tie-break (oldest first)
    version: int = 0  # changes whenever its release value may have: older entries in the release heap are stale
    # Its last score: the value at (version, time, gap epoch). Four fields, not one tuple: a tuple per score would be
    # a new object the collector tracks at every re-key (a young collection every ~40 steps at 10,000 sessions).
    scored_version: int = -1
    scored_at: float = 0.0
    scored_epoch: int = 0
    scored_value: float = 0.0
    ended: bool = False  # ended while a request of it was in the engine: that request's finish ends it (no pin)
    whole_only: bool = False  # its pin is of use only whole (a sliding window past block 0: no tail release)

    @property
    def pinned(self) -> bool:
        return self.pinned_blocks > 0

    @property
    def keeps_pin(self) -> bool:
        """A turn's start releases nothing of the pin it did not hit (`kvsched.core.shared_turns`)."""
        return self.joins_pin or self.union_pin

    @property
    def expires_at(self) -> float:
        return (self.last_finished or 0.0) + self.ttl_s

    @property
    def pin_all_running(self) -> bool:
        """A request of the session runs and holds every block of its pin: releasing it frees nothing, so it is no
        victim of the release order or of its TTL (unlike a pin beyond its running requests)."""
        return bool(self.active_requests) and not self.pin_beyond_running


@dataclass(frozen=True, slots=True)
class SessionView:
    """A read-only row for `GET /kvsched/sessions` and metrics."""

    session_id: str
    cache_salted: bool
    role: str | None
    pinned_blocks: int
    pinned_tokens: int
    idle_s: float
    ttl_s: float
    turns: int
    hits: int
    hit_tokens: int
    active_requests: int
    branch: int = 0
    inferred: bool = False
    # A shared inferred session's companion (a negative branch): the answers a turn continuing one of them did not
    # continue, kept for their users until they come back or the union's TTL (`kvsched.core.shared_answers`)
    companion: bool = False


def view_of(r: SessionRecord, now: float) -> SessionView:
    return SessionView(
        session_id=str(r.key.session_id), cache_salted=r.key.cache_salt is not None, role=r.role,
        pinned_blocks=r.pinned_blocks, pinned_tokens=r.pinned_tokens,
        idle_s=0.0 if r.last_finished is None or r.active_requests else max(now - r.last_finished, 0.0),
        ttl_s=r.ttl_s, turns=r.turns, hits=r.hits, hit_tokens=r.hit_tokens, active_requests=r.active_requests,
        branch=r.key.branch, inferred=r.key.inferred, companion=r.key.branch < 0,
    )
