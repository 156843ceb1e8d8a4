"""`kvsched bench traces`: kvsched against LRU and OPT on imported production traces, pools sized from the peak live
block set, and how much a return predictor could add.

For every trace (default: the Mooncake traces `kvsched trace fetch mooncake` caches) and live-basis pressure (1.5x and
3x), the simulator's sides: `lru`, `kvsched` (its settings from the `KVSCHED_*` variables, as the engine) and `opt`
(Belady on the pool alone: a near-bound, not a proven one, see `kvsched.sim.policies.OptPolicy`), each as its share of
OPT's saving, and the issue-24 gate: kvsched closes 30% of the gap between LRU's share and 1. Then `kvsched + FP8 tier`:
kvsched as shipped with its host tier at the engine's default size (2x the pool's bytes, here a Llama 3.1 8B FP8 pool:
2x its blocks) and restores timed at `--h2d-gbps`; the tier holds KV beyond the pool, so its share can pass 1 (OPT is
Belady on the pool alone). Its baseline on the same host memory is `LRU + CPU offload`: stock vLLM with its own CPU
offloading connector (every computed block stored to host, LRU there; kvsched.sim.offload). Then the headroom, on the
same pool, with long TTLs (`--ttl`, default 600 s):
- `kvsched, long TTL`: every finished turn pinned that long (the engine's value order decides under pressure);
- `first turns unpinned`: no pin after a session's first turn (what a return model learned per turn index would do
  where first turns rarely return; online-knowable);
- `end oracle`: each session's last turn says it is the last (clairvoyant: pins only for sessions that return);
- `class oracle`, `class weights`, `class TTLs`: pins chosen from hindsight return rates (or return times: a TTL per
  class) of engine-visible turn classes (turn index, prompt and output length, gap since the previous turn), fitted on
  the turns they are scored on (kvsched.bench.traces_classes; the class table, the AUC and the theta and price curves
  are in the JSON; `class_oracle_gate_met`: the best of the three reaches the gate);
- `class oracle, cross-fitted`, `class TTLs, cross-fitted`: the same, each session's turns acting on classes fitted on
  the other half of the sessions: what a learner of those classes could reach without memorising the outcomes it is
  scored on (`cross_fitted_gate_met`: the better of the two reaches the gate).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from kvsched.bench.args import check_args, check_out_path, count
from kvsched.bench.common import provenance, table, write_json
from kvsched.bench.plots import grouped_bars, save_beside
from kvsched.core.tier_config import TIER_EVICTION_ORDERS

PRESSURES = (1.5, 3.0)
# the largest pool replayed: the tier side's slots (2x the pool's) are a Python list, which `kvsched simulate` keeps
# under 2**26 too (found by review: --pressure 1e-6 was a MemoryError, 1e-300 an OverflowError)
MAX_POOL_BLOCKS = 2**25
# the options' defaults, applied in `run` (None in the parser: an option given where it does not apply is refused)
DEFAULTS = {"ttl": 600.0, "h2d_gbps": 32.0, "tier_eviction": "recency"}


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("traces", help="kvsched vs LRU vs OPT on imported traces",
                                                       description=__doc__)
    p.add_argument("traces", nargs="*", type=Path,
                   help="kvsched-schema traces (default: the fetched Mooncake ones, `kvsched trace fetch mooncake`)")
    p.add_argument("--pressure", type=float, action="append", default=None,
                   help="live-basis pressure (repeatable; default 1.5 and 3)")
    p.add_argument("--ttl", type=float, default=None, help="TTL of the headroom sides, seconds (default 600)")
    p.add_argument("--no-headroom", action="store_true", help="only lru, kvsched, opt and the tier side")
    p.add_argument("--no-tier", action="store_true", help="without the host-memory sides (FP8 tier, CPU offload)")
    p.add_argument("--h2d-gbps", type=float, default=None, help="the tier side's host-to-device bandwidth (GB/s)")
    p.add_argument("--tier-eviction", choices=TIER_EVICTION_ORDERS, default=None,
                   help="the tier side's eviction order (default recency, as the engine)")
    p.add_argument("--timing", type=int, default=0, metavar="N",
                   help="also replay LRU and kvsched N more times each, alternating, and report their CPU times "
                        "(min and median) and kvsched/LRU: the replay's cost (issue 24: within 3x LRU's)")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=run)


def first_turns(trace: Any) -> np.ndarray:
    seen: set[int] = set()
    first = np.zeros(len(trace), dtype=bool)
    for i, s in enumerate(trace.session.tolist()):
        if s not in seen:
            first[i] = True
            seen.add(s)
    return first


def last_turns(trace: Any) -> np.ndarray:
    last: dict[int, int] = {}
    for i, s in enumerate(trace.session.tolist()):
        last[s] = i
    end = np.zeros(len(trace), dtype=bool)
    end[list(last.values())] = True
    return end


TIER_SIDE = "kvsched + FP8 tier"
OFFLOAD_SIDE = "LRU + CPU offload"  # stock vLLM's OffloadingConnector on the same host bytes (kvsched.sim.offload)


def tier_config(cfg: Any, block_size: int, h2d_gbps: float, eviction: str = "recency") -> Any:
    """`cfg` with kvsched's FP8 tier as the engine sizes it by default (`auto_budget_bytes`: 2x the pool's bytes; the
    host's quarter does not bind for a pool this size) in slots of the replay's model (an FP8 pool: pages copied raw)."""
    from kvsched.core.planner import ModelShape, fp8_tier_block_bytes
    from kvsched.core.tier_config import auto_budget_bytes

    block_bytes = fp8_tier_block_bytes(ModelShape.from_preset("llama-3.1-8b"), "fp8", block_size)
    if block_bytes != int(cfg.bytes_per_token) * block_size:
        raise ValueError("the replay's bytes per token are not the tier model's")
    pool_bytes = cfg.capacity_blocks * block_bytes
    return replace(cfg, tier_bytes=auto_budget_bytes(pool_bytes, 8 * pool_bytes), tier_block_bytes=block_bytes,
                   restore_bytes_per_s=h2d_gbps * 1e9, tier_eviction=eviction)


def measure(trace: Any, pressure: float, retention: Any, ttl: float, headroom: bool = True,
            model: Any = None, tier_h2d_gbps: float | None = 32.0, tier_eviction: str = "recency") -> dict[str, Any]:
    """Shares of OPT's saving at live-basis `pressure` (see the module docstring for the sides); the class sides when
    `headroom` and a `model` (kvsched.bench.traces_classes.fit, with the same `ttl`) are given; the tier side unless
    `tier_h2d_gbps` is None."""
    from kvsched.bench.traces_classes import CROSS_SIDES, IN_SAMPLE_SIDES, class_sides, curve_summary
    from kvsched.sim.replay import ReplayConfig, replay

    live = trace.peak_live_blocks()
    cfg = ReplayConfig(capacity_blocks=max(int(np.ceil(live / pressure)), 1), retention=retention)
    runs = {p: replay(trace, p, cfg) for p in ("lru", "kvsched", "opt")}
    tier: dict[str, Any] = {}
    if tier_h2d_gbps is not None:
        tcfg = tier_config(cfg, trace.block_size, tier_h2d_gbps, tier_eviction)
        runs[TIER_SIDE] = replay(trace, "kvsched", tcfg)
        runs[OFFLOAD_SIDE] = replay(trace, "lru+offload", tcfg)
        tier = {"tier": {"slots": tcfg.tier_bytes // tcfg.tier_block_bytes, "bytes": tcfg.tier_bytes,
                         "h2d_gbps": tier_h2d_gbps, "eviction": tier_eviction,
                         "restored_tokens": runs[TIER_SIDE].restored_tokens}}
    if headroom:
        long_ttl = replace(cfg, retention=replace(retention, default_ttl_s=ttl, max_ttl_s=max(ttl, retention.max_ttl_s)))
        runs["kvsched, long TTL"] = replay(trace, "kvsched", long_ttl)
        runs["first turns unpinned"] = replay(replace(trace, ttl_s=np.where(first_turns(trace), 0.0, ttl)),
                                              "kvsched", long_ttl)
        runs["end oracle"] = replay(replace(trace, end=last_turns(trace) | trace.end), "kvsched", long_ttl)
        if model is not None:
            sides, curve = class_sides(trace, model, long_ttl)
            runs.update(sides)
    best = runs["opt"].tokens_saved
    share = {k: (r.tokens_saved / best if best else None) for k, r in runs.items()}
    lru = share["lru"] or 0.0
    gate = lru + 0.3 * (1.0 - lru)
    extra: dict[str, Any] = {}
    if headroom and model is not None:
        bound = max(share[k] or 0.0 for k in IN_SAMPLE_SIDES)
        cross = max(share[k] or 0.0 for k in CROSS_SIDES)
        extra = {"class_oracle": curve_summary(model, curve, best), "class_oracle_gate_met": bound >= gate,
                 "cross_fitted_gate_met": cross >= gate}
    return {"peak_live_blocks": live, "distinct_blocks": trace.working_set_blocks(), "capacity_blocks": cfg.capacity_blocks,
            "share_of_opt_saving": share, "gate_share": gate, "gate_met": (share["kvsched"] or 0.0) >= gate,
            "prefill_over_lru": {k: r.prefill_tokens_computed / runs["lru"].prefill_tokens_computed
                                 for k, r in runs.items()},
            "wall_s": {k: round(r.wall_s, 3) for k, r in runs.items()}, **tier, **extra}


def replay_cost(trace: Any, pressure: float, retention: Any, reps: int) -> dict[str, Any]:
    """CPU seconds of `reps` replays of each of LRU and kvsched (as shipped), alternating so that a machine's drift hits
    both alike: min and median per side and kvsched/LRU of each. Process time, not wall: another process on the machine
    does not count (wall times on a shared 2-core VM varied by +-30% from minute to minute)."""
    import statistics
    import time

    from kvsched.sim.replay import ReplayConfig, replay

    cfg = ReplayConfig(capacity_blocks=max(int(np.ceil(trace.peak_live_blocks() / pressure)), 1), retention=retention)
    cpu: dict[str, list[float]] = {"lru": [], "kvsched": []}
    for rep in range(reps):
        for side in ("lru", "kvsched") if rep % 2 == 0 else ("kvsched", "lru"):  # found by review: LRU always first
            t0 = time.process_time()
            replay(trace, side, cfg)
            cpu[side].append(time.process_time() - t0)
    mins = {k: min(v) for k, v in cpu.items()}
    medians = {k: statistics.median(v) for k, v in cpu.items()}
    return {"reps": reps, "cpu_s": {k: [round(x, 4) for x in v] for k, v in cpu.items()},
            "min_s": mins, "median_s": medians, "kvsched_over_lru_min": mins["kvsched"] / mins["lru"],
            "kvsched_over_lru_median": medians["kvsched"] / medians["lru"]}


def default_traces() -> list[Path]:
    """The fetched Mooncake traces, converted again first where an older converter wrote them."""
    from kvsched.sim.mooncake import cached_traces

    return cached_traces()


def run(args: argparse.Namespace) -> int:
    from kvsched.bench.traces_classes import fit, summary
    from kvsched.core.config import RetentionConfig
    from kvsched.sim.mooncake import stale_note
    from kvsched.sim.replay import ReplayConfig
    from kvsched.sim.trace import Trace

    try:  # the cached files are converted again first when an older converter wrote them: a bad one is refused
        paths = args.traces or default_traces()
    except (ValueError, OSError) as exc:  # found by review: a traceback
        print(f"kvsched bench traces: error: {exc}", file=sys.stderr)
        return 2
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"kvsched bench traces: error: missing {missing} (run `kvsched trace fetch mooncake`)", file=sys.stderr)
        return 2
    pressures = args.pressure or list(PRESSURES)
    try:
        retention = RetentionConfig.from_env()
        given = [f"--{k.replace('_', '-')}" for k in DEFAULTS if getattr(args, k) is not None]
        for k, default in DEFAULTS.items():
            if getattr(args, k) is None:
                setattr(args, k, default)
        # found by review: --pressure 0, -1 or nan and a --ttl the headroom sides' RetentionConfig refuses were
        # tracebacks after minutes of replays; --ttl nan with --no-headroom wrote NaN into the JSON
        if not all(0 < p < math.inf for p in pressures):
            raise ValueError(f"--pressure must be a finite number > 0, got {', '.join(f'{p:g}' for p in pressures)}")
        if not 0 <= args.ttl < math.inf:
            raise ValueError(f"--ttl must be a finite number of seconds >= 0, got {args.ttl:g}")
        if not 0 < args.h2d_gbps < math.inf:
            raise ValueError(f"--h2d-gbps must be a finite number > 0, got {args.h2d_gbps:g}")
        check_args(args, timing=count(0, 10**4))  # (23 digits would replay until stopped)
        # found by review: these were ignored, and a repeated --pressure overwrote its own JSON entry
        if args.no_tier and (tier_flags := [f for f in given if f != "--ttl"]):
            raise ValueError(f"{' and '.join(tier_flags)} only appl{'y' if len(tier_flags) > 1 else 'ies'} to the tier "
                             "sides, which --no-tier leaves out")
        if args.no_headroom and "--ttl" in given:
            raise ValueError("--ttl only applies to the headroom sides, which --no-headroom leaves out")
        if len({f"{p:g}" for p in pressures}) < len(pressures):
            raise ValueError("--pressure names one value twice (the JSON keys pressures by value): "
                             f"{', '.join(f'{p:g}' for p in pressures)}")
        if len({p.name for p in paths}) < len(paths):  # found by review: the JSON kept the last one's figures only
            raise ValueError(f"two traces share a file name (the JSON keys traces by name): {[str(p) for p in paths]}")
        check_out_path("--out", args.out, tuple(paths))  # a directory, a trace read or unwritable: now, not after
        traces = [Trace.load(path) for path in paths]  # a malformed trace, or a directory: before any replay
        if empty := [str(path) for path, t in zip(paths, traces, strict=True) if not len(t)]:
            raise ValueError(f"no requests to replay in {empty} (a header only)")  # else a ZeroDivisionError
        for path, t in zip(paths, traces, strict=True):  # the pools, before any replay (found by review: tracebacks)
            if not (live := t.peak_live_blocks()):
                raise ValueError(f"{path}: no block is used twice (peak live set 0): no live-basis pool to size")
            if not (most := live / min(pressures)) <= MAX_POOL_BLOCKS:  # (a float: 1e-320 makes it infinite)
                raise ValueError(f"--pressure {min(pressures):g} makes a pool of {most:.4g} blocks for {path}, past "
                                 f"the replay's {MAX_POOL_BLOCKS} (its tier's slots are a list)")
    except (ValueError, OSError) as exc:
        print(f"kvsched bench traces: error: {exc}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"traces": {}}
    rows = []
    for path, trace in zip(paths, traces, strict=True):
        if (note := stale_note(trace.meta)) is not None:
            print(f"kvsched bench traces: warning: {path}: {note}", file=sys.stderr)
        per: dict[str, Any] = {"requests": len(trace), "sessions": len(trace.sessions), "meta": trace.meta,
                               "pressures": {}}
        result["traces"][path.name] = per
        model = None
        if not args.no_headroom:
            model = fit(trace, args.ttl, ReplayConfig(capacity_blocks=1))  # the replay's time model (its defaults)
            per["return_classes"] = summary(trace, model)
            auc = per["return_classes"]["auc"]  # None when no turn, or every turn, returns within --ttl (e.g. 1.5 s)
            print(f"{path.name}: {per['return_classes']['classes']} return classes, AUC "
                  f"{'n/a (no turn returns within --ttl, or every one does)' if auc is None else f'{auc:.3f}'} "
                  "(hindsight rates)", flush=True)
        for p in pressures:
            m = per["pressures"][f"{p:g}"] = measure(trace, p, retention, args.ttl, not args.no_headroom, model,
                                                     None if args.no_tier else args.h2d_gbps, args.tier_eviction)
            s = m["share_of_opt_saving"]
            c = m.get("class_oracle")
            rows.append([path.name, f"{p:g}x", *(round(v, 3) if v is not None else "-" for v in s.values()),
                         round(m["gate_share"], 3),
                         *([c["best_theta"], m["class_oracle_gate_met"], m["cross_fitted_gate_met"]] if c else [])])
            header = ["trace", "live pressure", *s.keys(), "gate",
                      *(["best theta", "class gate met", "cross-fitted gate met"] if c else [])]
            print(table(rows[-1:], header), flush=True)
            if args.timing:
                cost = m["replay_cost"] = replay_cost(trace, p, retention, args.timing)
                print(f"replay cost, {path.name} {p:g}x: kvsched/LRU CPU time {cost['kvsched_over_lru_median']:.2f} "
                      f"(median of {args.timing}), {cost['kvsched_over_lru_min']:.2f} (min)", flush=True)
    print(table(rows, header))
    result["config"] = {"pressures_live": pressures, "headroom_ttl_s": args.ttl, "retention": retention.as_dict(),
                        "provenance": provenance()}
    write_json(args.out, result)
    save_beside(args.out, lambda path: grouped_bars(
        {f"{name.split('.')[0]} {p}x": m["share_of_opt_saving"] for name, t in result["traces"].items()
         for p, m in t["pressures"].items()}, path, "share of OPT's saving (live-basis pressure)", "share", None))
    return 0
