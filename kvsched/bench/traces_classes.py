"""The hindsight class bound of `kvsched bench traces`: the best pins a return model of engine-visible turn classes
could choose (kvsched.sim.return_classes), with each class's return rate taken from the whole trace.

A learner that sees only these classes can at best learn each class's true return rate and act on it; the rates fitted
on the whole trace are that limit (an online learner has only the past, and fewer samples). Two ways to act on them,
both on the bench's long-TTL pool:
- `class oracle`: pin a finished turn for the long TTL when its class's rate is at least theta, else not at all; theta
  swept over THETAS and the best one chosen in hindsight per trace and pressure (theta 0 pins every turn);
- `class weights`: pin every turn, with its class's rate (rounded to WEIGHT_STEP) as the pin's role weight, so the
  release order lets turns unlikely to return go first. The rate reaches the policy as the turn's role, which also
  keys the policy's gap model (its gaps are then learned per rate step instead of per agent role).
If neither reaches the gate, a learner of these classes that pins or weights by them cannot either, short of better
features. What the bound leaves out: TTLs other than the bench's one (run it with another `--ttl`; per-class TTLs),
subsets of classes no threshold selects, and rates that drift over the trace (a learner of recent rates could follow
them).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import numpy as np

from kvsched.sim.replay import ReplayConfig, ReplayResult, replay
from kvsched.sim.return_classes import FEATURES, ClassRates, auc, class_rates, classify, pinned_classes, returns_within
from kvsched.sim.trace import Trace

THETAS = tuple(round(0.05 * k, 2) for k in range(21))
WEIGHT_STEP = 0.05
SIDES = ("class oracle", "class weights")


@dataclass(frozen=True, slots=True)
class ReturnModel:
    """A trace's classes (all of FEATURES) and their hindsight return rates within `ttl_s` of a turn's end."""

    cls: np.ndarray  # class index per request
    rates: ClassRates
    returned: np.ndarray  # bool per request: its session's next request came within ttl_s of its end
    ttl_s: float

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
    returned = returns_within(trace.session, trace.t, finish, ttl_s)
    return ReturnModel(cls, class_rates(cls, labels, returned), returned, ttl_s)


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


def with_class_weights(trace: Trace, model: ReturnModel, cfg: ReplayConfig) -> tuple[Trace, ReplayConfig]:
    """`trace` with each turn's class rate (rounded to WEIGHT_STEP) as its role (replacing any agent role the trace
    has), and `cfg` weighting each such role by that rate."""
    steps = np.rint(model.turn_rate / WEIGHT_STEP).astype(np.int64)
    roles: list[str | None] = [f"return {s * WEIGHT_STEP:.2f}" for s in steps.tolist()]
    weights = {**cfg.retention.role_weights, **{r: float(r.split()[1]) for r in set(roles) if r}}
    retention = replace(cfg.retention, role_weights=MappingProxyType(weights))
    return replace(trace, role=roles), replace(cfg, retention=retention)


def best_theta(curve: dict[float, ReplayResult]) -> float:
    """The theta whose run saved the most prompt tokens (the smallest of equals)."""
    return max(sorted(curve), key=lambda th: curve[th].tokens_saved)  # max() keeps the first of equals


def class_sides(trace: Trace, model: ReturnModel, long_ttl: ReplayConfig
                ) -> tuple[dict[str, ReplayResult], dict[float, ReplayResult]]:
    """({side: run} for SIDES, {theta: run} over THETAS): thetas that pin the same classes share one replay, and the
    class oracle is the theta whose run saved the most (the first such theta)."""
    rates = model.rates.rate
    by_mask: dict[bytes, ReplayResult] = {}
    curve: dict[float, ReplayResult] = {}
    for theta in THETAS:
        key = pinned_classes(rates, theta).tobytes()
        if key not in by_mask:
            by_mask[key] = replay(with_class_ttls(trace, model, theta, model.ttl_s), "kvsched", long_ttl)
        curve[theta] = by_mask[key]
    best = best_theta(curve)
    weighted_trace, weighted_cfg = with_class_weights(trace, model, long_ttl)
    return {"class oracle": curve[best], "class weights": replay(weighted_trace, "kvsched", weighted_cfg)}, curve


def curve_summary(model: ReturnModel, curve: dict[float, ReplayResult], best_tokens: int) -> dict[str, Any]:
    """The JSON's per-pressure block: share of OPT's saving per theta, the best theta and the turns it pins."""
    share = {f"{th:g}": (r.tokens_saved / best_tokens if best_tokens else None) for th, r in curve.items()}
    best = best_theta(curve)
    pinned = pinned_classes(model.rates.rate, best)[model.cls]
    return {"theta_curve": share, "best_theta": best, "pinned_turn_fraction": float(pinned.mean()) if len(pinned) else 0.0,
            "distinct_replays": len({id(r) for r in curve.values()})}
