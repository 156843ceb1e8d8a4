"""Configuration of the retention policy (one frozen dataclass; built from env/CLI by the adapters)."""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any

from kvsched.core.compaction_config import parse_bool
from kvsched.core.env import env_setting
from kvsched.core.pin_payback import PaybackConfig
from kvsched.core.shared_turns import DEFAULT_PIN_ANSWERS

INT_FIELDS = frozenset({"max_sessions", "payback_sampling", "payback_window", "payback_cooldown", "shared_pin_answers"})
BOOL_FIELDS = frozenset({"payback_from_start"})
# KVSCHED_PAYBACK_SAMPLING=auto (the default): the pins' fallback to LRU is on, at this sampling, when the pool has no
# FP8 tier, at every TTL: without the tier pins were measured to cost more than LRU (Mooncake traces at 120-600 s: up
# to 1.116x LRU's prefill; adversarial traces at the default 30 s: up to 1.205x, tools/adversarial). Off with the
# tier, where a released pin's blocks go to the tier and come back from it (0.65-0.95x LRU's prefill). The tracker
# is fed only once the pool evicts (`PinPayback.arm`), so an engine that never evicts pays nothing for it.
AUTO_PAYBACK_SAMPLING = 8
DEFAULT_ROLE_WEIGHTS = MappingProxyType({"orchestrator": 2.0, "planner": 1.5, "worker": 1.0})


def _count(value: Any, name: str) -> int:
    """An integral number (int, numpy integer, a float such as 1e5) as an int; else ValueError naming the field."""
    if type(value) is int:
        return value
    try:
        as_int = operator.index(value)
    except TypeError:
        as_float = _number(value, name)
        if not as_float.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
        as_int = int(as_float)
    return as_int


def _number(value: Any, name: str) -> float:
    """A real number (int, float, numpy scalar) as a Python float; else ValueError naming the field."""
    if type(value) is float:
        return value
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long and how much KV kvsched keeps for idle sessions.

    default_ttl_s: how long a finished turn's prefix stays pinned when the request gives no hint.
    max_ttl_s: cap on a per-request TTL hint (`ttl_s` / `X-Session-TTL`).
    pin_budget_fraction: the largest fraction of the KV block pool that pins may hold at once. The default lets pins
        fill the pool: they yield to live requests on demand (lowest value first, before any preemption), and
        releasing them early only hands their blocks to vLLM's LRU order (measured: 0.9 computed ~5% more prefill
        than 1.0 on `kvsched bench agents --quick`). Lower it to reserve part of the pool for ordinary prefix caching.
    default_next_use_s: expected gap before a session's next turn until its own gaps have been seen.
    gap_ewma_alpha: weight of the newest observed inter-turn gap in the expected next-use estimate.
    role_weights: value multiplier per agent role (orchestrators are worth more: every worker waits on them).
    max_sessions: bound on the session table (idle, unpinned records are dropped oldest first).
    inferred_first_turn_weight: an inferred session's first turn (kvsched.core.lineage) starts at this x the first
        turns' learned return share (a request without a session field may be a one-shot); inferred first turns' own
        share replaces it as their outcomes are learned (`ReleaseValues.weight_of`).
    payback_sampling, payback_window, payback_cooldown, payback_margin: the online fallback to LRU
        (`kvsched.core.pin_payback`): 1 block key in `payback_sampling` feeds a ghost LRU pool (0: off, pins always
        on; None, the default, is "auto": `for_pool` turns it on at `AUTO_PAYBACK_SAMPLING` for a pool without the FP8
        tier, off with it); with `payback_start_ttl_s` 0,
        pins are suspended for `payback_cooldown` requests when, over a window of `payback_window` requests, the
        pool hit fewer than (1 - `payback_margin`) x the ghost's hits.
    payback_start_ttl_s, payback_gain, payback_gain_down, payback_floor, payback_deadband: with `payback_start_ttl_s`
        > 0 (the default: whenever sampling is on), the pin ledger (`kvsched.core.pin_ledger`) replaces that switch:
        new pins' TTLs are capped at `payback_start_ttl_s` x exp(`payback_gain` x (z - `payback_deadband`)) above the
        dead band, x exp(`payback_gain_down` x (z + `payback_deadband`)) below it, z the run's hit balance against the
        ghost LRU in units of its noise (the start while |z| <= the dead band), at most `max_ttl_s`, and 0 (no pins)
        below `payback_floor` x `payback_start_ttl_s`. `payback_start_ttl_s` 0: the windowed switch.
    payback_tier_start_ttl_s: the ledger's start when the pool has an FP8 tier (0, the default: `max_ttl_s`, pins as
        configured until the balance says they lose).
    payback_from_start: feed the payback tracker from the first request; False (the default): from the pool's first
        eviction of a cached block (before it pins cannot cost a hit; the ghost is judged once it has filled).
    return_threshold: pin a finished turn only when the online return model (`kvsched.core.return_model`) gives its
        class at least this chance of the session's next turn arriving within `default_ttl_s`; its blocks otherwise go
        to the LRU as in stock vLLM. None (the default): off, every turn is pinned.
    shared_pin_answers: answers one shared inferred session's pin keeps at most (`kvsched.core.shared_turns`): past
        it the oldest added answer leaves the pin first.
    """

    default_ttl_s: float = 30.0
    max_ttl_s: float = 600.0
    pin_budget_fraction: float = 1.0
    default_next_use_s: float = 5.0
    gap_ewma_alpha: float = 0.3
    role_weights: MappingProxyType[str, float] = field(default_factory=lambda: DEFAULT_ROLE_WEIGHTS)
    max_sessions: int = 100_000
    inferred_first_turn_weight: float = 0.5
    payback_sampling: int | None = None
    payback_window: int = 1000
    payback_cooldown: int = 2000
    payback_margin: float = 0.0
    payback_start_ttl_s: float = 30.0
    payback_gain: float = 0.5
    payback_gain_down: float = 4.0
    payback_floor: float = 1.0 / 32
    payback_deadband: float = 2.0
    payback_tier_start_ttl_s: float = 0.0
    payback_from_start: bool = False
    return_threshold: float | None = None
    shared_pin_answers: int = DEFAULT_PIN_ANSWERS

    def __post_init__(self) -> None:
        self._normalize_types()
        if not 0.0 <= self.pin_budget_fraction <= 1.0:
            raise ValueError(f"pin_budget_fraction must be in [0, 1], got {self.pin_budget_fraction}")
        for name in ("default_ttl_s", "max_ttl_s", "default_next_use_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.inferred_first_turn_weight) and self.inferred_first_turn_weight >= 0):
            raise ValueError(f"inferred_first_turn_weight must be a finite number >= 0, got "
                             f"{self.inferred_first_turn_weight}")
        if not all(math.isfinite(w) and w >= 0 for w in self.role_weights.values()):
            raise ValueError(f"role_weights must be finite numbers >= 0, got {dict(self.role_weights)}")
        if not 0.0 < self.gap_ewma_alpha <= 1.0:
            raise ValueError("gap_ewma_alpha must be in (0, 1]")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be >= 1")
        for name in ("payback_sampling", "payback_cooldown"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.payback_window < 1:
            raise ValueError("payback_window must be >= 1")
        if not -1.0 < self.payback_margin < 1.0:
            raise ValueError("payback_margin must be in (-1, 1)")
        if not (math.isfinite(self.payback_start_ttl_s) and self.payback_start_ttl_s >= 0):
            raise ValueError(f"payback_start_ttl_s must be a finite number >= 0, got {self.payback_start_ttl_s}")
        for name in ("payback_gain", "payback_gain_down"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if not 0.0 <= self.payback_floor <= 1.0:
            raise ValueError(f"payback_floor must be in [0, 1], got {self.payback_floor}")
        if not (math.isfinite(self.payback_tier_start_ttl_s) and self.payback_tier_start_ttl_s >= 0):
            raise ValueError(f"payback_tier_start_ttl_s must be a finite number >= 0, got {self.payback_tier_start_ttl_s}")
        if not (math.isfinite(self.payback_deadband) and self.payback_deadband >= 0):
            raise ValueError(f"payback_deadband must be a finite number >= 0, got {self.payback_deadband}")
        if self.shared_pin_answers < 1:
            raise ValueError(f"shared_pin_answers must be >= 1, got {self.shared_pin_answers}")
        if self.return_threshold is not None and not 0.0 <= self.return_threshold <= 1.0:
            raise ValueError(f"return_threshold must be in [0, 1], got {self.return_threshold}")

    def _normalize_types(self) -> None:
        """Each field as the exact Python type it declares: the mypyc-compiled policy reads these with run-time type
        checks, so `max_sessions=1e5`, a numpy integer or float, or `payback_from_start=1`, which pure Python took,
        raised TypeError there at the first turn (found by the type audit). Integral numbers become ints, numbers
        floats, 0/1 bools; a count that is not a whole number is a ValueError naming the field."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "role_weights":
                new: Any = MappingProxyType({str(k): _number(w, f"role_weights[{k!r}]") for k, w in value.items()})
            elif value is None and f.name in ("payback_sampling", "return_threshold"):
                continue
            elif f.name in INT_FIELDS:
                new = _count(value, f.name)
            elif f.name in BOOL_FIELDS:
                if value not in (0, 1) or isinstance(value, str):
                    raise ValueError(f"{f.name} must be true or false, got {value!r}")
                new = bool(value)
            else:
                new = _number(value, f.name)
            if new is not value:
                object.__setattr__(self, f.name, new)

    def for_pool(self, tier: bool) -> RetentionConfig:
        """This configuration for a pool with (`tier`) or without the FP8 tier: an "auto" payback sampling resolved
        (see `AUTO_PAYBACK_SAMPLING`). The engine and the simulator call it before building the policy."""
        if self.payback_sampling is not None:
            return self
        return replace(self, payback_sampling=0 if tier else AUTO_PAYBACK_SAMPLING)

    def payback(self) -> PaybackConfig:
        """The payback tracker's settings (an unresolved "auto" sampling is off: see `for_pool`)."""
        return PaybackConfig(sampling=self.payback_sampling or 0, window=self.payback_window,
                             cooldown=self.payback_cooldown, margin=self.payback_margin,
                             start=self.payback_start_ttl_s, gain=self.payback_gain, gain_down=self.payback_gain_down,
                             floor=self.payback_floor,
                             ceiling=self.max_ttl_s, deadband=self.payback_deadband,
                             tier_start=self.payback_tier_start_ttl_s, from_start=self.payback_from_start)

    def role_weight(self, role: str | None) -> float:
        return float(self.role_weights.get(role or "worker", 1.0))

    def ttl_for(self, hint: float | None) -> float:
        return min(self.default_ttl_s if hint is None else hint, self.max_ttl_s)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RetentionConfig:
        """Read `KVSCHED_<FIELD>` variables (e.g. KVSCHED_DEFAULT_TTL_S=60; KVSCHED_ROLE_WEIGHTS=orchestrator:3,worker:1).

        Environment variables reach vLLM's engine-core process, which the CLI does not."""
        env = os.environ if environ is None else environ
        updates: dict[str, Any] = {}
        for f in fields(cls):
            var = f"KVSCHED_{f.name.upper()}"
            raw = env_setting(env, var)
            if raw is None:
                continue
            try:
                if f.name == "role_weights":
                    weights = dict(DEFAULT_ROLE_WEIGHTS)
                    for part in raw.split(","):
                        role, sep, w = part.partition(":")
                        if not sep or not role.strip():
                            raise ValueError(f"expected role:weight, got {part!r}")
                        weights[role.strip()] = float(w)
                    updates[f.name] = MappingProxyType(weights)
                elif f.name == "payback_sampling" and raw.strip().lower() == "auto":
                    updates[f.name] = None
                elif f.name in BOOL_FIELDS:
                    updates[f.name] = parse_bool(raw)
                elif f.name in INT_FIELDS:
                    updates[f.name] = int(raw)
                else:
                    updates[f.name] = float(raw)
            except ValueError as exc:
                raise ValueError(f"{var}={raw!r}: {exc}") from None
        try:
            config = replace(cls(), **updates)
        except ValueError as exc:  # out of range: name the variable that set it
            # the field the message starts with (payback_gain is a substring of payback_gain_down)
            names = sorted((n for n in updates if str(exc).startswith(n + " ")), key=len, reverse=True) or \
                [n for n in updates if n in str(exc)]
            raise ValueError(f"KVSCHED_{names[0].upper() if names else '*'}: {exc}") from None
        # Found by review: a default TTL set above the cap was cut to the cap without a word. (The cap alone below the
        # default, e.g. KVSCHED_MAX_TTL_S=0 to record a deployment with no pins, caps it as documented.)
        if "default_ttl_s" in updates and config.default_ttl_s > config.max_ttl_s:
            raise ValueError(f"KVSCHED_DEFAULT_TTL_S={config.default_ttl_s:g} is above KVSCHED_MAX_TTL_S="
                             f"{config.max_ttl_s:g}, which caps every TTL: raise KVSCHED_MAX_TTL_S too")
        return config

    def as_dict(self) -> dict[str, Any]:
        """Plain values (for result files and logs)."""
        return {f.name: dict(v) if isinstance(v := getattr(self, f.name), MappingProxyType) else v
                for f in fields(self)}
