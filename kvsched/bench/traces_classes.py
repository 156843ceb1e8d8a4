"""The hindsight class bound of `kvsched bench traces`: the best pins a return model of engine-visible turn classes
could choose (kvsched.sim.return_classes), with each class's return rate taken from the whole trace.

A learner that sees only these classes can at best learn each class's true return rate and act on it; the rates fitted
on the whole trace are that limit (an online learner has only the past, and fewer samples). Two ways to act on them,
both on the bench's long-TTL pool:
- `class oracle`: pin a finished turn for the long TTL when its class's rate is at least theta, else not at all; theta
  swept over THETAS and the best one chosen in hindsight per trace and pressure (theta 0 pins every turn);
- `class weights`: pin every turn, with its class's rate (rounded to WEIGHT_STEP) as the pin's role weight, so the
  release order lets turns unlikely to return go first. The rate reaches the policy as the turn's role, which also
  keys the policy's gap model (its gaps are then learned per rate step instead of per agent role);
- `class TTLs`: a TTL per class (`kvsched.sim.return_classes.class_ttls`: the one of 0-600 s at which the class's
  returns caught best outweigh the block-seconds its pins hold, at a price of LAMBDAS per block-second, the best price
  chosen in hindsight per trace and pressure): what a model of each class's return-time distribution, not only its
  rate within one horizon, could at best do.
If none reaches the gate, a learner of these classes that pins, weights or times pins by them cannot either, short of
better features. What the bound leaves out: subsets of classes no threshold or price selects, and rates that drift
over the trace (a learner of recent rates could follow them).

Those three fit each class on the very turns they are scored on: a class of a few turns is pinned exactly when its
turns return, which no learner can do (it memorises outcomes; 1,510 of conversation's 12,031 turns sit in classes of
under 10 turns). The cross-fitted sides remove that: the sessions are split in two folds, and each fold's turns get the
rates or TTLs fitted on the other fold's sessions (still the whole trace's time span: more than an online learner,
which has only the past), shrunk toward the turn index's by CROSS_STRENGTHS pseudo-turns, the strength and the
threshold or price chosen in hindsight:
- `class oracle, cross-fitted`: as `class oracle`, over CROSS_THETAS;
- `class TTLs, cross-fitted`: as `class TTLs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from kvsched.sim.replay import ReplayConfig, ReplayResult, replay
from kvsched.sim.return_classes import (
    CLASS_TTLS_S,
    FEATURES,
    ClassRates,
    auc,
    class_rates,
    class_ttls,
    classify,
    gap_after,
    pinned_classes,
    session_folds,
    shrunk_rates,
    turn_index,
)
from kvsched.sim.return_classes import TURN_CAP as RETURN_TURN_CAP
from kvsched.sim.trace import Trace

THETAS = tuple(round(0.05 * k, 2) for k in range(21))
WEIGHT_STEP = 0.05
# Prices of a block-second of pool, in blocks of prefill (`class TTLs`): the best on the Mooncake traces at live 1.5x
# and 3x lay between 0.001 and 0.007, about the LRU pool's marginal hits per block-second on synthetic, not on
# conversation (BENCHMARKS.md).
LAMBDAS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.007, 0.01)
CROSS_STRENGTHS = (0.0, 10.0, 100.0, 1000.0)  # pseudo-turns a class borrows from its turn index (cross-fitted)
CROSS_THETAS = tuple(round(0.05 * k, 2) for k in range(1, 13))  # 0.05 ... 0.6 (theta 0 is `kvsched, long TTL`)
IN_SAMPLE_SIDES = ("class oracle", "class weights", "class TTLs")
CROSS_SIDES = ("class oracle, cross-fitted", "class TTLs, cross-fitted")
SIDES = IN_SAMPLE_SIDES + CROSS_SIDES


@dataclass(frozen=True, slots=True)
class ReturnModel:
    """A trace's classes (all of FEATURES) and their hindsight return rates within `ttl_s` of a turn's end."""

    cls: np.ndarray  # class index per request
    rates: ClassRates
    returned: np.ndarray  # bool per request: its session's next request came within ttl_s of its end
    ttl_s: float
    gap: np.ndarray  # seconds from each request's end to its session's next arrival (inf: none)
    blocks: np.ndarray  # full blocks of each request's prompt and output: what a pin at its end would hold
    parent_of: np.ndarray  # class -> its turn index class (0 ... TURN_CAP - 1): what the cross-fitted sides shrink to
    folds: np.ndarray  # bool per request: its session's fold (`session_folds`)

    @property
    def turn_rate(self) -> np.ndarray:
        """Each request's class return rate (the score a perfectly learned class model gives it)."""
        rate: np.ndarray = self.rates.rate[self.cls]
        return rate


def fit(trace: Trace, ttl_s: float, cfg: ReplayConfig) -> ReturnModel:
    """Classes and hindsight rates of `trace`. A turn ends at its arrival plus its unloaded time in the replay's time
    model (its whole prompt prefilled, then its output decoded); the replay's real end is later by any wait for memory
    and earlier by any prefix hit, seconds either way against a TTL of minutes."""
    cls, labels = classify(trace.session, trace.t, trace.prompt_tokens // trace.block_size, trace.output_tokens)
    finish = trace.t + trace.prompt_tokens / cfg.prefill_tps + trace.output_tokens * cfg.tpot_s
    gap = gap_after(trace.session, trace.t, finish)
    returned = gap <= ttl_s
    blocks = (trace.prompt_tokens + trace.output_tokens) // trace.block_size
    parent_of = np.zeros(len(labels), dtype=np.int64)
    parent_of[cls] = np.minimum(turn_index(trace.session), RETURN_TURN_CAP) - 1
    return ReturnModel(cls, class_rates(cls, labels, returned), returned, ttl_s, gap, blocks, parent_of,
                       session_folds(trace.session))


def summary(trace: Trace, model: ReturnModel) -> dict[str, Any]:
    """The JSON's per-trace block: the class table, the return base rate, the AUC of the class rate as a return
    predictor and, for comparison, of each feature's classes alone (also hindsight rates)."""
    alone = {}
    for f in FEATURES:
        c, labels = classify(trace.session, trace.t, trace.prompt_tokens // trace.block_size, trace.output_tokens, (f,))
        alone[f] = auc(class_rates(c, labels, model.returned).rate[c], model.returned)
    turns, returned = model.rates.turns, model.returned
    return {"ttl_s": model.ttl_s, "features": list(FEATURES), "turns": len(trace),
            "returning_turns": int(returned.sum()), "return_rate": float(returned.mean()) if len(trace) else None,
            "classes": len(model.rates.labels), "turns_in_classes_under_10": int(turns[turns < 10].sum()),
            "auc": auc(model.turn_rate, returned), "auc_one_feature": alone, "table": model.rates.table()}


def with_class_ttls(trace: Trace, model: ReturnModel, theta: float, ttl_s: float) -> Trace:
    """`trace` with every turn's TTL hint: `ttl_s` for turns of a class rated at least theta, 0 (no pin) otherwise."""
    pin = pinned_classes(model.rates.rate, theta)[model.cls]
    return replace(trace, ttl_s=np.where(pin, ttl_s, 0.0))


def with_ttls_per_class(trace: Trace, model: ReturnModel, lam: float) -> Trace:
    """`trace` with every turn's TTL hint its class's `class_ttls` at price `lam` (0: no pin)."""
    ttl = class_ttls(model.cls, len(model.rates.labels), model.gap, model.blocks, lam)
    return replace(trace, ttl_s=ttl[model.cls])


def cross_fitted(model: ReturnModel, fitted: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Per request, the value `fitted(train)` gives its class (an array over classes), `train` the rows of the other
    fold's sessions: no request's own outcome is in what it gets."""
    out = np.zeros(len(model.cls))
    for fold in (False, True):
        test = model.folds == fold
        out[test] = fitted(~test)[model.cls[test]]
    return out


def cross_fitted_pins(trace: Trace, model: ReturnModel, theta: float, strength: float) -> Trace:
    """`trace` with every turn's TTL hint: the long TTL if its class's rate fitted on the other fold's sessions
    (shrunk by `strength`) is at least theta, 0 otherwise."""
    n = len(model.rates.labels)
    rate = cross_fitted(model, lambda train: shrunk_rates(model.cls[train], n, model.returned[train], model.parent_of,
                                                          strength))
    return replace(trace, ttl_s=np.where(rate >= theta, model.ttl_s, 0.0))


def cross_fitted_ttls(trace: Trace, model: ReturnModel, lam: float, strength: float) -> Trace:
    """`trace` with every turn's TTL hint its class's `class_ttls` at price `lam`, fitted on the other fold's
    sessions (shrunk by `strength`)."""
    n = len(model.rates.labels)
    return replace(trace, ttl_s=cross_fitted(model, lambda train: class_ttls(
        model.cls[train], n, model.gap[train], model.blocks[train], lam, parent_of=model.parent_of, strength=strength)))


def with_class_weights(trace: Trace, model: ReturnModel, cfg: ReplayConfig) -> tuple[Trace, ReplayConfig]:
    """`trace` with each turn's class rate (rounded to WEIGHT_STEP) as its role (replacing any agent role the trace
    has), and `cfg` weighting each such role by that rate."""
    steps = np.rint(model.turn_rate / WEIGHT_STEP).astype(np.int64)
    roles: list[str | None] = [f"return {s * WEIGHT_STEP:.2f}" for s in steps.tolist()]
    weights = {**cfg.retention.role_weights, **{r: float(r.split()[1]) for r in set(roles) if r}}
    retention = replace(cfg.retention, role_weights=MappingProxyType(weights))
    return replace(trace, role=roles), replace(cfg, retention=retention)


def best_theta(curve: dict[float, ReplayResult]) -> float:
    """The theta (or price) whose run saved the most prompt tokens (the smallest of equals)."""
    return max(sorted(curve), key=lambda th: curve[th].tokens_saved)  # max() keeps the first of equals


@dataclass(frozen=True, slots=True)
class ClassCurves:
    """The class sides' sweeps: {theta: run} over THETAS (`class oracle`) and {price: run} over LAMBDAS (`class
    TTLs`); settings that pin alike share one replay."""

    theta: dict[float, ReplayResult]
    lam: dict[float, ReplayResult]
    cross_theta: dict[tuple[float, float], ReplayResult]  # (strength, theta)
    cross_lam: dict[tuple[float, float], ReplayResult]  # (strength, price)


def class_sides(trace: Trace, model: ReturnModel, long_ttl: ReplayConfig
                ) -> tuple[dict[str, ReplayResult], ClassCurves]:
    """({side: run} for SIDES, the sweeps): each swept side is the setting whose run saved the most (the first such)."""
    by_ttls: dict[bytes, ReplayResult] = {}

    def run(t: Trace, cfg: ReplayConfig) -> ReplayResult:
        key = t.ttl_s.tobytes() if t.ttl_s is not None else b""
        if key not in by_ttls:
            by_ttls[key] = replay(t, "kvsched", cfg)
        return by_ttls[key]

    curve = {theta: run(with_class_ttls(trace, model, theta, model.ttl_s), long_ttl) for theta in THETAS}
    by_ttls.clear()  # the price sweep's TTLs may reach past the long TTL's cap: its own config
    upto = max(CLASS_TTLS_S)
    timed = replace(long_ttl, retention=replace(long_ttl.retention, max_ttl_s=max(upto, long_ttl.retention.max_ttl_s)))
    lam = {p: run(with_ttls_per_class(trace, model, p), timed) for p in LAMBDAS}
    cross_lam = {(st, p): run(cross_fitted_ttls(trace, model, p, st), timed) for st in CROSS_STRENGTHS for p in LAMBDAS}
    by_ttls.clear()
    cross_theta = {(st, th): run(cross_fitted_pins(trace, model, th, st), long_ttl)
                   for st in CROSS_STRENGTHS for th in CROSS_THETAS}
    weighted_trace, weighted_cfg = with_class_weights(trace, model, long_ttl)
    sides = {"class oracle": curve[best_theta(curve)], "class weights": replay(weighted_trace, "kvsched", weighted_cfg),
             "class TTLs": lam[best_theta(lam)],
             "class oracle, cross-fitted": cross_theta[best_setting(cross_theta)],
             "class TTLs, cross-fitted": cross_lam[best_setting(cross_lam)]}
    return sides, ClassCurves(curve, lam, cross_theta, cross_lam)


def best_setting(runs: dict[tuple[float, float], ReplayResult]) -> tuple[float, float]:
    """The (strength, threshold or price) whose run saved the most prompt tokens (the first of equals in sorted order)."""
    return max(sorted(runs), key=lambda k: runs[k].tokens_saved)


def curve_summary(model: ReturnModel, curves: ClassCurves, best_tokens: int) -> dict[str, Any]:
    """The JSON's per-pressure block: share of OPT's saving per theta, the best theta and the turns it pins; the same
    per price for the class TTLs, with the mean TTL the best price gives a turn."""
    def share(curve: dict[float, ReplayResult]) -> dict[str, float | None]:
        return {f"{k:g}": (r.tokens_saved / best_tokens if best_tokens else None) for k, r in curve.items()}

    best = best_theta(curves.theta)
    pinned = pinned_classes(model.rates.rate, best)[model.cls]
    price = best_theta(curves.lam)
    ttl = class_ttls(model.cls, len(model.rates.labels), model.gap, model.blocks, price)[model.cls]
    return {"theta_curve": share(curves.theta), "best_theta": best,
            "pinned_turn_fraction": float(pinned.mean()) if len(pinned) else 0.0,
            "distinct_replays": len({id(r) for r in curves.theta.values()}),
            "price_curve": share(curves.lam), "best_price": price,
            "class_ttl_pinned_turn_fraction": float((ttl > 0).mean()) if len(ttl) else 0.0,
            "class_ttl_mean_s": float(ttl.mean()) if len(ttl) else 0.0,
            "cross_fitted": {
                "oracle_best": list(best_setting(curves.cross_theta)), "ttls_best": list(best_setting(curves.cross_lam)),
                "oracle_curve": {f"{st:g}/{th:g}": (r.tokens_saved / best_tokens if best_tokens else None)
                                 for (st, th), r in curves.cross_theta.items()},
                "ttls_curve": {f"{st:g}/{p:g}": (r.tokens_saved / best_tokens if best_tokens else None)
                               for (st, p), r in curves.cross_lam.items()}}}
