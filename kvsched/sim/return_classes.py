"""Return classes: what the engine sees of a turn when it finishes, and how often turns like it come back.

Whether to pin a finished turn hinges on whether its session returns within the TTL. An online return model can only
condition on what the engine sees at that moment: the turn's index in its session, its prompt and output lengths and
the gap since the session's previous turn. Binning those into classes and taking each class's return rate over the
WHOLE trace (hindsight: more than a learner that has seen only the past can know) gives the best any learner of these
classes can estimate; `kvsched bench traces` replays pins chosen from these rates (its "class oracle" sides) to bound
what such a model could reach, and the AUC below says how separable returning turns are with these features at all.

Pure numpy over per-request arrays in arrival order (a `Trace`'s columns), so the tests build cases by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES = ("turn", "prompt", "output", "gap")
TURN_CAP = 4  # turn indices 1, 2, 3, 4+
GAP_EDGES_S = (30.0, 120.0, 600.0)  # gap since the previous turn: none / <30 s / <120 s / <600 s / more
CLASS_TTLS_S = (0.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)  # what `class_ttls` chooses from


def turn_index(session: np.ndarray) -> np.ndarray:
    """1-based index of every request in its session (requests in arrival order)."""
    seen: dict[int, int] = {}
    out = np.empty(len(session), dtype=np.int64)
    for i, s in enumerate(session.tolist()):
        out[i] = seen[s] = seen.get(s, 0) + 1
    return out


def previous_gap_s(session: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Seconds from the session's previous arrival to this one; NaN for a session's first turn."""
    last: dict[int, float] = {}
    out = np.full(len(session), np.nan)
    for i, (s, ti) in enumerate(zip(session.tolist(), t.tolist(), strict=True)):
        if s in last:
            out[i] = ti - last[s]
        last[s] = ti
    return out


def log2_bucket(n: np.ndarray) -> np.ndarray:
    """floor(log2(n)) for n >= 1, -1 for 0: lengths spread over orders of magnitude, so classes are octaves."""
    n = np.asarray(n, dtype=np.int64)
    out = np.full(len(n), -1, dtype=np.int64)
    pos = n > 0
    out[pos] = np.floor(np.log2(n[pos])).astype(np.int64)
    return out


def gap_bucket(gap_s: np.ndarray) -> np.ndarray:
    """0 for no previous turn (NaN), then 1.. for each edge of GAP_EDGES_S the gap is under, len(edges)+1 beyond."""
    gap_s = np.asarray(gap_s, dtype=np.float64)
    out = np.searchsorted(np.asarray(GAP_EDGES_S), np.nan_to_num(gap_s, nan=0.0), side="right") + 1
    return np.where(np.isnan(gap_s), 0, out).astype(np.int64)


def _label(name: str, v: int) -> str:
    if name == "turn":
        return f"turn {v}+" if v == TURN_CAP else f"turn {v}"
    if name == "gap":
        return ("first", *(f"gap<{e:g}s" for e in GAP_EDGES_S), f"gap>={GAP_EDGES_S[-1]:g}s")[v]
    return f"{name} 0" if v < 0 else f"{name} 2^{v}"


def classify(session: np.ndarray, t: np.ndarray, prompt_blocks: np.ndarray, output_tokens: np.ndarray,
             features: tuple[str, ...] = FEATURES) -> tuple[np.ndarray, list[str]]:
    """(class index per request, class labels): each request's class is its tuple of the chosen features' buckets
    (`turn`: index capped at TURN_CAP; `prompt`: log2 of its prompt's full blocks; `output`: log2 of its output
    tokens; `gap`: the gap bucket). Labels read e.g. "turn 2 | prompt 2^4 | output 2^8 | gap<120s"."""
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown return-class features {sorted(unknown)}; known: {FEATURES}")
    buckets = {"turn": np.minimum(turn_index(session), TURN_CAP) if "turn" in features else None,
               "prompt": log2_bucket(prompt_blocks), "output": log2_bucket(output_tokens),
               "gap": gap_bucket(previous_gap_s(session, t)) if "gap" in features else None}
    columns = [np.asarray(buckets[f]).tolist() for f in features]
    keys: list[tuple[int, ...]] = list(zip(*columns, strict=True)) if columns else [()] * len(session)
    index: dict[tuple[int, ...], int] = {}
    cls = np.array([index.setdefault(k, len(index)) for k in keys], dtype=np.int64)
    labels = [" | ".join(_label(f, v) for f, v in zip(features, k, strict=True)) or "all" for k in index]
    return cls, labels


def gap_after(session: np.ndarray, t: np.ndarray, finish: np.ndarray) -> np.ndarray:
    """Seconds from each request's end to its session's next arrival (negative: the next one arrived while it ran;
    inf: the session's last request)."""
    nxt: dict[int, float] = {}
    out = np.full(len(session), np.inf)
    for i in range(len(session) - 1, -1, -1):
        s = int(session[i])
        if s in nxt:
            out[i] = nxt[s] - float(finish[i])
        nxt[s] = float(t[i])
    return out


def class_ttls(cls: np.ndarray, n_classes: int, gap: np.ndarray, blocks: np.ndarray, lam: float,
               ttls: tuple[float, ...] = CLASS_TTLS_S, parent_of: np.ndarray | None = None,
               strength: float = 0.0) -> np.ndarray:
    """Per class, the TTL of `ttls` (0: no pin) that a pin pays best at when a block-second of pool is worth `lam`
    blocks of prefill: the one maximising  sum_i blocks_i [0 < gap_i <= T]  -  lam sum_i blocks_i min(gap_i, T)  over
    the class's turns (`gap`: `gap_after`, so a turn returns within T when its gap is at most T; a turn whose next one arrived while it ran needs no pin and costs none).
    With the gaps of the whole trace this is hindsight: the per-class TTLs no single-TTL threshold policy can choose,
    and what a model of each class's return-time distribution could at best learn.

    `parent_of` (class -> parent class) and `strength` > 0: each class's sums also count `strength` turns of the mean
    blocks at its parent's per-block averages (shrinkage: a class seen a few times reads like its parent; one never
    seen in these rows, as its parent)."""
    pos = [t for t in ttls if t > 0]
    if not pos:
        return np.zeros(n_classes)
    held = np.clip(gap, 0.0, None)

    def sums(group: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Per group and TTL: blocks of the returns a pin catches, block-seconds it holds."""
        caught = np.stack([np.bincount(group, weights=blocks * ((gap > 0) & (gap <= t)), minlength=n) for t in pos], 1)
        cost = np.stack([np.bincount(group, weights=blocks * np.minimum(held, t), minlength=n) for t in pos], 1)
        return caught, cost

    caught, cost = sums(cls, n_classes)
    if parent_of is not None and strength > 0:
        parent = parent_of[cls]
        n_par = int(parent_of.max()) + 1
        weight = np.maximum(np.bincount(parent, weights=blocks, minlength=n_par), 1e-12)[:, None]
        parent_caught, parent_cost = sums(parent, n_par)
        pseudo = strength * (float(np.mean(blocks)) if len(blocks) else 0.0)
        caught = caught + pseudo * (parent_caught / weight)[parent_of]
        cost = cost + pseudo * (parent_cost / weight)[parent_of]
    net = caught - lam * cost
    best = net.argmax(axis=1)  # the shortest of equals
    return np.where(net[np.arange(n_classes), best] > 0, np.asarray(pos)[best], 0.0)


def shrunk_rates(cls: np.ndarray, n_classes: int, returned: np.ndarray, parent_of: np.ndarray | None = None,
                 strength: float = 0.0) -> np.ndarray:
    """Return rate per class over these rows; with `parent_of` and `strength` > 0, shrunk toward the parent class's
    rate by `strength` pseudo-turns (Beta-binomial, as the online return model). A class with no rows: 0, or its
    parent's rate."""
    n = np.bincount(cls, minlength=n_classes).astype(np.float64)
    r = np.bincount(cls, weights=returned.astype(np.float64), minlength=n_classes)
    if parent_of is None or strength <= 0:
        raw: np.ndarray = r / np.maximum(n, 1)
        return raw
    parent = parent_of[cls]
    n_par = int(parent_of.max()) + 1
    pn = np.bincount(parent, minlength=n_par)
    prate = np.bincount(parent, weights=returned.astype(np.float64), minlength=n_par) / np.maximum(pn, 1)
    shrunk: np.ndarray = (r + strength * prate[parent_of]) / (n + strength)
    return shrunk


def session_folds(session: np.ndarray) -> np.ndarray:
    """Two folds of whole sessions (by the parity of the session index): a cross-fitted bound fits each fold's
    classes on the other fold's sessions, so no turn's own outcome is in the rate or TTL applied to it."""
    folds: np.ndarray = (np.asarray(session) % 2).astype(bool)
    return folds


@dataclass(frozen=True, slots=True)
class ClassRates:
    """Hindsight return rate per class: `turns` and `returns` counted over the whole trace, `rate` = returns/turns."""

    labels: list[str]
    turns: np.ndarray
    returns: np.ndarray

    @property
    def rate(self) -> np.ndarray:
        rate: np.ndarray = self.returns / np.maximum(self.turns, 1)
        return rate

    def table(self) -> list[dict[str, object]]:
        """Rows (class, turns, returns, rate), most turns first (the JSON's table)."""
        order = np.argsort(-self.turns, kind="stable")
        return [{"class": self.labels[c], "turns": int(self.turns[c]), "returns": int(self.returns[c]),
                 "rate": round(float(self.rate[c]), 4)} for c in order]


def class_rates(cls: np.ndarray, labels: list[str], returned: np.ndarray) -> ClassRates:
    n = len(labels)
    return ClassRates(labels, np.bincount(cls, minlength=n), np.bincount(cls, weights=returned, minlength=n
                                                                         ).astype(np.int64))


def auc(score: np.ndarray, label: np.ndarray) -> float | None:
    """Area under the ROC curve of `score` as a predictor of `label` (Mann-Whitney U, ties counted half): the chance
    a random returning turn scores above a random non-returning one. None when either side is empty."""
    label = np.asarray(label, dtype=bool)
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return None
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of each distinct score's last member (1-based); ties share the mean rank
    ranks = (upper - (counts - 1) / 2.0)[inverse]
    return float((ranks[label].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def pinned_classes(rates: np.ndarray, theta: float) -> np.ndarray:
    """Classes a threshold policy pins: those whose return rate is at least `theta`."""
    return rates >= theta
