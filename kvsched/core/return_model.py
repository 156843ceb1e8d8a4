"""Will this session come back within the horizon? An online estimate per class of finished turn, to skip pins that
would not pay.

On production traces most sessions never return (Mooncake conversation: most turns are a session's last), so pinning
every finished turn for its TTL holds blocks LRU would have put to better use. `kvsched.sim.return_classes` measured,
in hindsight, how well classes of what the engine sees at a turn's end separate returning turns; this is the online
version of that model, learned only from outcomes already known:

- a turn's class: its index in the session (1 to 7, 8+: the gap model's burst phases; 4+ until stop 52 merged a
  burst's last turn, which never returns, with the ones before it, which all do: tools/adversarial a2_honest), the
  octave of its reusable prefix in blocks (the engine knows the prefix it would pin, prompt and output together; the
  output length alone is not passed to the policy, so that feature of the hindsight classes is dropped) and the
  bucket of the time since the session's previous turn ended (none / < 30 s / < 120 s / < 600 s / more; an inferred
  session's first turn has a bucket of its own, -1: where clients name their sessions and some do not, an unnamed
  request is more often a one-shot);
- its outcome: returned when the session's next request arrives at most `horizon_s` after the turn ended, not when
  `horizon_s` passes without one (settled lazily, at the next event). Counted when the horizon ends, either way
  (`at_horizon`): a return is known as soon as it arrives but a miss only a horizon later, so counting returns at
  once overstates every class while misses are still pending (with a 600 s horizon on Mooncake synthetic, eager
  counting read first turns at ~0.5 for the first 10 minutes and pinned nearly all of them; they return ~20%). A
  Kaplan-Meier split of the horizon (an early interval learned sooner, then the rest) measured no better there;
- the estimate: Beta-binomial shrinkage along class -> turn index -> all turns. Each level's mean is its own returns
  plus `prior_strength` pseudo-outcomes at its parent's mean (the global one starts from Beta(1, 1)), so a class with
  few outcomes reads like its turn index, and a fresh model reads 0.5 (it pins while it knows nothing, at any
  threshold <= 0.5). Empirical Bayes in the sense of Efron & Morris (JASA 70, 1975), with a fixed prior strength.

Stdlib only, no clock: time comes from the caller (the retention policy's injected clock).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field

TURN_CAP = 8  # turn indices 1 to 7, 8+ (kvsched.core.next_use's max_phase; the hindsight classes stop at 4+)
GAP_EDGES_S = (30.0, 120.0, 600.0)  # time since the previous turn ended: none / < 30 s / < 120 s / < 600 s / more
PRIOR_STRENGTH = 10.0  # pseudo-outcomes a level borrows from its parent's mean
INFERRED_FIRST = -1  # the gap bucket of an inferred session's first turn

# (turn index capped, prefix block octave, gap bucket). Of any length for mypyc: a fixed-length tuple is unboxed in
# compiled code and boxed anew at every store and dict lookup, an object per finished turn (the interning undone).
ReturnClass = tuple[int, ...]
_GAP_0, _GAP_1, _GAP_2 = GAP_EDGES_S


def return_class(turns: int, blocks: int, gap_s: float | None, inferred: bool = False) -> ReturnClass:
    """The class of a turn that ended as the session's `turns`-th, holding `blocks` full blocks of reusable prefix,
    `gap_s` seconds after the session's previous turn ended (None: its first turn; `inferred`: of an inferred
    session)."""
    # Once per finished turn and per pin scored: the octave as the int's bit length (what int(math.log2(blocks)) gives
    # for every count below 2**48) and the gap's edges compared in line, not summed from a generator.
    if blocks > 0:
        octave = blocks.bit_length() - 1 if type(blocks) is int else int(math.log2(blocks))
    else:
        octave = -1
    if gap_s is None:
        gap = INFERRED_FIRST if inferred else 0
    else:
        gap = 1 + (gap_s >= _GAP_0) + (gap_s >= _GAP_1) + (gap_s >= _GAP_2)
    return (TURN_CAP if turns > TURN_CAP else turns if turns > 1 else 1), octave, gap


@dataclass(slots=True)
class Tally:
    """Outcomes counted for one level of one class."""

    returns: int = 0
    outcomes: int = 0

    def mean(self, prior: float, strength: float) -> float:
        return (self.returns + strength * prior) / (self.outcomes + strength)


@dataclass(slots=True)
class ReturnModel:
    """P(the session's next turn arrives within `horizon_s` of this one's end), per return class, learned online.

    `threshold`: `turn_finished` says no below it. `inferred_prior`: the inferred first turns' class starts at this x
    the first turns' share (`estimate`; the policy's inferred_first_turn_weight). `at_horizon`: count every outcome
    when its horizon ends (False: a return as soon as it arrives; biased upward, see the module docstring). The
    policy calls `turn_finished` at every turn end (pinned or not: the outcome does not depend on the pin, so what the
    model learns is not biased by what it decided) and `arrived` at every request arrival."""

    threshold: float
    horizon_s: float
    prior_strength: float = PRIOR_STRENGTH
    at_horizon: bool = True
    inferred_prior: float = 1.0
    total: Tally = field(default_factory=Tally)
    by_turn: dict[int, Tally] = field(default_factory=dict)
    by_class: dict[ReturnClass, Tally] = field(default_factory=dict)
    skipped: int = 0  # finished turns the model said not to pin
    # The awaited turns, oldest first, as parallel lists from `_head` on (the settled ones before it are cut off in
    # bulk): each turn's deadline (its end + the horizon: no return by then is a miss), session, class (one interned
    # tuple per class) and outcome (0 unknown, 1 missed, 2 returned); `_pending` maps a session to its awaited turn's
    # sequence number (`_base` + its index). No object per turn: an object per finished turn alive for the horizon
    # (an entry, its tuple and its class's) was all the garbage collector's young work in `kvsched bench sched`'s
    # timed steps: stock vLLM ran no collection there, kvsched ~30 in 300 steps, each traversing the young requests.
    _pending: dict[Hashable, int] = field(default_factory=dict)
    _deadlines: list[float] = field(default_factory=list)
    _keys: list[Hashable] = field(default_factory=list)
    _classes: list[ReturnClass] = field(default_factory=list)
    _outcomes: bytearray = field(default_factory=bytearray)
    _head: int = 0
    _base: int = 0
    _interned: dict[ReturnClass, ReturnClass] = field(default_factory=dict)

    def estimate(self, cls: ReturnClass, root: float | None = None) -> float:
        """The shrunk return probability of class `cls` from the outcomes settled so far; an inferred first turn's
        class starts at `inferred_prior` x its turn index's (a prior of its own: it may be a one-shot). The pin gate
        (`turn_finished`) and the release order (`ReleaseValues.weight_of`) both read it here (found by review: the
        gate read it unscaled, pinning under KVSCHED_RETURN_THRESHOLD what the value read as below it). `root`: the
        turn index's prior instead of all turns' mean (the release order's later turns: 1, see `weight_of`)."""
        # `Tally.mean` written out (the same expressions, so the same floats): this runs at every turn's end
        if root is None:
            total = self.total
            p = (total.returns + 2.0 * 0.5) / (total.outcomes + 2.0)  # Beta(1, 1)
        else:
            p = root
        strength = self.prior_strength
        turn = self.by_turn.get(cls[0])
        if turn is not None:
            p = (turn.returns + strength * p) / (turn.outcomes + strength)
        if cls[2] == INFERRED_FIRST:
            p *= self.inferred_prior
        full = self.by_class.get(cls)
        return (full.returns + strength * p) / (full.outcomes + strength) if full is not None else p

    def turn_finished(self, key: Hashable, turns: int, blocks: int, previous_end: float | None, now: float,
                      inferred: bool = False) -> bool:
        """The `turns`-th turn of session `key` (`inferred`: an inferred one) ended at `now` holding `blocks` blocks,
        its previous one at `previous_end` (None: none): True if it is worth pinning, i.e. its class's estimate is at
        least the threshold. Its outcome is then awaited."""
        earlier = self._pending.pop(key, None)
        if earlier is not None:  # a turn that arrived before the previous one ended: the session did come back
            self._known(earlier, True)
        deadlines = self._deadlines
        if self._head < len(deadlines) and deadlines[self._head] < now:  # `settle`'s own test, without its call
            self.settle(now)
        cls = return_class(turns, blocks, None if previous_end is None else max(now - previous_end, 0.0), inferred)
        pin = self.estimate(cls) >= self.threshold
        self.skipped += not pin
        self._pending[key] = self._base + len(deadlines)
        deadlines.append(now + self.horizon_s)
        self._keys.append(key)
        self._classes.append(self._interned.setdefault(cls, cls))
        self._outcomes.append(0)
        return pin

    def arrived(self, key: Hashable, now: float) -> None:
        """A request of session `key` arrived at `now`: its last turn's outcome, if awaited, is known."""
        entry = self._pending.pop(key, None)
        deadlines = self._deadlines
        if entry is not None:
            self._known(entry, now <= deadlines[entry - self._base])
        if self._head < len(deadlines) and deadlines[self._head] < now:  # `settle`'s own test, without its call
            self.settle(now)

    def ended(self, key: Hashable, now: float) -> None:
        """Session `key` ended at `now` with no request of it in the engine: its awaited turn is known never to return
        (a later request under its id is another conversation, not that turn's return). Counted as every outcome is,
        at its horizon (`at_horizon`): a miss counted at once, its class's returns not yet, would bias it down."""
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._known(entry, False)
        self.settle(now)

    def last_turn(self, key: Hashable, now: float) -> None:
        """The session's last turn (it ends the session) finished at `now`: it is not awaited, but an earlier turn of
        it that finished while this one ran did come back (as `turn_finished` counts it)."""
        earlier = self._pending.pop(key, None)
        if earlier is not None:
            self._known(earlier, True)
        self.settle(now)

    def settle(self, now: float) -> None:
        """Count as misses the awaited turns whose horizon ended before `now` (deadlines are appended in order: the
        horizon is fixed and the clock monotone)."""
        deadlines, i = self._deadlines, self._head
        end = len(deadlines)
        if i == end or deadlines[i] >= now:
            return
        pending, base = self._pending, self._base
        while i < end and deadlines[i] < now:
            key = self._keys[i]
            if pending.get(key) == base + i:
                del pending[key]
                self._count(self._classes[i], False)
            elif self.at_horizon:
                self._count(self._classes[i], self._outcomes[i] == 2)
            i += 1
        self._head = i
        if i >= 1024 and 2 * i >= end:  # cut the settled ones off, in bulk
            del deadlines[:i], self._keys[:i], self._classes[:i], self._outcomes[:i]
            self._base, self._head = base + i, 0

    @property
    def awaited(self) -> int:
        return len(self._pending)

    def _known(self, entry: int, returned: bool) -> None:
        """The awaited turn of sequence number `entry` did (or did not) return."""
        i = entry - self._base
        self._outcomes[i] = 2 if returned else 1
        if not self.at_horizon:
            self._count(self._classes[i], returned)

    def _count(self, cls: ReturnClass, returned: bool) -> None:
        for tally in (self.total, self.by_turn.setdefault(cls[0], Tally()), self.by_class.setdefault(cls, Tally())):
            tally.returns += returned
            tally.outcomes += 1
