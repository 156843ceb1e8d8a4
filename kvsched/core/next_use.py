"""When an idle session's next turn is expected: empirical inter-turn gaps, classed by role and by burst phase.

Agents work in bursts: a worker runs a few quick tool turns, then waits for something else (its orchestrator gathering
the round, a human); an orchestrator waits for its slowest worker. Within one role the gap after a turn therefore
depends on where the turn sits in its burst. A session's *burst phase* is the number of turns it has finished since
its current burst began (its first turn, or the first turn after a long gap); a gap is *long* when it exceeds
`long_factor` times the role's median gap (a wait on something other than the session's own tool call). Gaps are
remembered per (role, phase) and per role; an estimate uses the finest class that has enough gaps longer than the
session's idle time.

This is EVA's idea (Beckmann and Sanchez, "Maximizing Cache Performance Under Uncertainty", HPCA 2017): age-conditioned
reuse statistics, kept per reuse class; our classes are role and burst phase, both of which the engine sees.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Collection
from itertools import accumulate, islice


class GapHistory:
    """The latest `window` inter-turn gaps (seconds) of one class, and the mean residual wait they imply:
    E[gap - idle | gap > idle], the expected time left before a session idle for `idle` seconds returns.

    The gaps are kept sorted as they arrive (one insertion and at most one deletion, O(log n) search plus a memmove).
    `_top[k]` is the sum of the k largest gaps, added largest first; a change to the window keeps the sums above it
    (their terms and order of addition are unchanged) and the rest is added back lazily, only as far as a query needs:
    a query is one bisection, and the sums are those a full rebuild would give, bit for bit."""

    def __init__(self, window: int) -> None:
        self.recent: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []
        self._top: list[float] = [0.0]  # sums of the 0, 1, ... largest gaps; the first `_exact` still are
        self._exact = 1

    def __len__(self) -> int:
        return len(self.recent)

    def add(self, gap: float) -> None:
        s = self._sorted
        if len(self.recent) == self.recent.maxlen:
            i = bisect.bisect_left(s, self.recent[0])
            del s[i]
            if len(s) - i + 1 < self._exact:  # the sums of the len(s) - i gaps above it stand
                self._exact = len(s) - i + 1
        self.recent.append(gap)
        i = bisect.bisect_right(s, gap)  # where bisect.insort puts it
        s.insert(i, gap)
        if len(s) - i < self._exact:
            self._exact = len(s) - i

    def median(self) -> float | None:
        """The upper median of the window (None while it is empty)."""
        return self._sorted[len(self._sorted) // 2] if self._sorted else None

    def mean_residual(self, idle_s: float, min_samples: int) -> float | None:
        """Mean of `gap - idle_s` over the gaps longer than `idle_s`; None if fewer than `min_samples` are."""
        s = self._sorted
        end = len(s)
        n = end - bisect.bisect_right(s, idle_s)
        if n < min_samples:
            return None
        top = self._top
        if self._exact < len(top):
            del top[self._exact:]
        k = len(top)
        if k <= n:  # add the k-th to the n-th largest gap, largest first, to the sums still exact
            top.extend(islice(accumulate(reversed(s[end - n:end - k + 1]), initial=top[-1]), 1, None))
        self._exact = len(top)
        return top[n] / n - idle_s


class GapModel:
    """Gap histories per role and per (role, burst phase); see the module docstring.

    window: gaps remembered per class. min_samples: gaps longer than the idle time a class needs before its mean
    residual is trusted (below that the next coarser class answers). long_factor: a gap over this many times the
    role's median gap ends a burst (1.5x to 3x measured alike on the simulator's quick traces). max_phase: phases
    from this one on share a class (bounds the classes per role). roles: the roles kept apart; any other role's gaps
    are those of no role (None: every role is kept apart). Roles are the clients' strings: the retention policy keeps
    the known roles and those its configuration weighs (found by review: one class per string any client sent, never
    dropped and shared by every API key, was 20,000 classes after 20,000 made-up roles)."""

    def __init__(self, window: int = 256, min_samples: int = 3, long_factor: float = 2.0, max_phase: int = 8,
                 roles: Collection[str] | None = None) -> None:
        self.roles = None if roles is None else frozenset(roles)
        self.window = window
        self.min_samples = min_samples
        self.long_factor = long_factor
        self.max_phase = max_phase
        self.by_role: dict[str | None, GapHistory] = {}
        self.by_phase: dict[tuple[str | None, int], GapHistory] = {}
        self.epoch = 0  # counts observed gaps: an estimate made at the same epoch (and idle time) still stands

    def observe(self, role: str | None, phase: int, gap: float) -> bool:
        """Record a gap that followed a turn at burst phase `phase`; True if it was long (the next turn opens a new
        burst). Judged against the role's median before this gap, once the role has `min_samples` gaps."""
        if self.roles is not None and role not in self.roles:
            role = None
        history = self.by_role.get(role)
        if history is None:
            history = self.by_role[role] = GapHistory(self.window)
        self.epoch += 1
        median = history.median() if len(history) >= self.min_samples else None
        history.add(gap)
        key = (role, min(phase, self.max_phase))
        by_phase = self.by_phase.get(key)
        if by_phase is None:
            by_phase = self.by_phase[key] = GapHistory(self.window)
        by_phase.add(gap)
        return median is not None and gap > self.long_factor * median

    def mean_residual(self, role: str | None, phase: int, idle_s: float) -> float | None:
        """Expected seconds still to wait for a session of `role` at burst phase `phase` idle for `idle_s`: from the
        (role, phase) gaps, else the role's, else None (neither has `min_samples` gaps longer than `idle_s`)."""
        if self.roles is not None and role not in self.roles:
            role = None
        by_phase = self.by_phase.get((role, min(phase, self.max_phase)))
        if by_phase is not None:
            residual = by_phase.mean_residual(idle_s, self.min_samples)
            if residual is not None:
                return residual
        history = self.by_role.get(role)
        return history.mean_residual(idle_s, self.min_samples) if history is not None else None
