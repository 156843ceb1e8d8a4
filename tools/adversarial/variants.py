"""Scratch variants of the release order and the return model, for experiments only (never the defaults): importing
this module applies the one named by the VARIANT environment variable to the pure core, by monkeypatching.

  noclass      a turn's class reads its turn index's share (the class level of `ReturnModel.estimate` dropped)
  js           the class level's prior strength from the classes' spread beyond sampling noise (method of moments,
               Efron & Morris 1975) instead of the fixed 10: no spread, the class reads its turn index's share
  age          the release order by age alone (oldest finished turn first): LRU's order among the pins
  coldageN     `age` until the return model has settled N outcomes (N default 1), then the usual order
  warmN        no pins until the return model has settled N outcomes (N default 1): LRU until then
  own          a pin's next use is the session's own expected gap when that is shorter and not yet overdue

usage: VARIANT=NAME python tools/adversarial/variants.py compare PRESSURES TRACE...   (kvsched / LRU prefill, as
       timeline.py replays; its ratio counts rejected requests' prompts on both sides)
       VARIANT=NAME python tools/adversarial/variants.py simulate ...   (the kvsched CLI with the variant applied)
(Adversarial review, stop 53.)"""
from __future__ import annotations

import math
import os
import sys

from kvsched.core import retention_values as rv
from kvsched.core import return_model as rm

V = os.environ.get("VARIANT", "")


def _strength(children: list[rm.Tally], p: float, floor: float) -> float:
    n = sum(t.outcomes for t in children)
    if n == 0 or not 0 < p < 1:
        return floor
    dev = sum(t.outcomes * (t.returns / t.outcomes - p) ** 2 for t in children if t.outcomes)
    tau2 = (dev - (len(children) - 1) * p * (1 - p)) / n  # the classes' spread beyond sampling noise
    return 1e9 if tau2 <= 0 else max(p * (1 - p) / tau2 - 1, floor)


def _estimate(self: rm.ReturnModel, cls: rm.ReturnClass, root: float | None = None) -> float:
    p = self.total.mean(0.5, 2.0) if root is None else root
    turn = self.by_turn.get(cls[0])
    if turn is not None:
        p = turn.mean(p, self.prior_strength)
    if cls[2] == rm.INFERRED_FIRST:
        p *= self.inferred_prior
    full = self.by_class.get(cls)
    if V == "noclass" or full is None:
        return p
    kin = [t for c, t in self.by_class.items()
           if c[0] == cls[0] and (c[2] == rm.INFERRED_FIRST) == (cls[2] == rm.INFERRED_FIRST)]
    tp = turn.returns / turn.outcomes if turn is not None and turn.outcomes else p
    return full.mean(p, _strength(kin, tp, self.prior_strength))


def _age_key(rec: rv.SessionRecord, now: float) -> float:
    return 1.0 / (1.0 + max(now - rec.last_finished, 0.0)) if rec.last_finished is not None else 1.0


_value, _pin_next_use, _turn_finished = rv.ReleaseValues._value, rv.ReleaseValues.pin_next_use_s, \
    rm.ReturnModel.turn_finished
N = int("".join(c for c in V if c.isdigit()) or 1)
if V in ("noclass", "js"):
    rm.ReturnModel.estimate = _estimate  # type: ignore[method-assign]
elif V == "age" or V.startswith("coldage"):
    def _aged(self, rec, now, tokens, bytes_per_token, pin=True):  # type: ignore[no-untyped-def]
        if V == "age" or self.returns.total.outcomes < N:
            return _age_key(rec, now)
        return _value(self, rec, now, tokens, bytes_per_token, pin)
    rv.ReleaseValues._value = _aged  # type: ignore[method-assign]
elif V.startswith("warm"):
    def _warm(self, *a, **k):  # type: ignore[no-untyped-def]
        return _turn_finished(self, *a, **k) and self.total.outcomes >= N
    rm.ReturnModel.turn_finished = _warm  # type: ignore[method-assign]
elif V == "own":
    def _own(self, rec, idle_s):  # type: ignore[no-untyped-def]
        expected = _pin_next_use(self, rec, idle_s)
        own = rec.expected_gap_s
        return own if rec.gaps_seen and idle_s <= own < expected else expected
    rv.ReleaseValues.pin_next_use_s = _own  # type: ignore[method-assign]
elif V:
    raise SystemExit(f"unknown VARIANT {V}")


def compare(pressures: list[float], paths: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import timeline as tl

    from kvsched.core.config import RetentionConfig
    from kvsched.sim import replay as rp
    from kvsched.sim.trace import Trace
    for path in paths:
        trace, row = Trace.load(path), []
        for p in pressures:
            cap = max(math.ceil(trace.peak_live_blocks() / p), 1)
            cfg = rp.ReplayConfig(capacity_blocks=cap, bytes_per_token=65536.0, retention=RetentionConfig.from_env())
            lru, _ = tl.run(trace, "lru", cfg)
            kv, _ = tl.run(trace, "kvsched", cfg)
            row.append(f"{kv.sum() / lru.sum():.4f} ({int(kv.sum() - lru.sum()):+d})")
        print(V or "default", os.path.basename(path), " ".join(row), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "compare":
        compare([float(x) for x in sys.argv[2].split(",")], sys.argv[3:])
    else:
        from kvsched.cli import main
        sys.exit(main(sys.argv[1:]))
