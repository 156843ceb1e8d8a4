"""`kvsched bench router`: kvsched's session router against plain consistent hashing and power-of-two-choices, on the
same simulated fleet and the same seeded sessions, in one run.

The fleet: `n` engine replicas; 10,000 agent sessions, each a sequence of turns (one in flight at a time) with a
heavy-tailed turn rate (Pareto, alpha 1.2: a few sessions are very busy) and log-normal turn lengths (sigma 1), the
rates scaled so about 16 turns are in flight per replica. A replica holds the KV of every session whose last turn it
served, until it dies. Three phases on the same event stream: steady (all replicas), outage (one killed; its in-flight
turns are retried at once), return (the replica back: same slot for kvsched, a fresh unique id for consistent hashing,
as in Ray), then one replica added.

- `affinity`: share of follow-up turns that land on the replica holding the session's KV (all phases).
- `max_over_mean_load`: busiest replica's work (turn-seconds served) over the mean, in the steady phase after warm-up.
  `max_over_mean_in_flight_p99`: p99 over arrivals of (most turns in flight on one replica / mean).
- `moved_on_kill` / `moved_on_scale_up`: share of all sessions whose next turn would land elsewhere after the event,
  read on an idle fleet (no load bound in play) so that it shows the mapping, not a momentary overflow.
- `kill_return`: sessions moved by the kill that were not the dead replica's, dead replica's sessions back home after
  its return, and other sessions moved by the return.
- `route_us_p50`: wall time of one routing decision in this process (policy code only, no RPC).

Baselines as Ray 2.60 ships them: `consistent_hash` is `serve/experimental/consistent_hash_router.py` (mmh3 ring, 100
virtual nodes on the replica's unique id, two fallbacks only when the primary is at `max_ongoing_requests`, here 4x the
mean in flight); `pow2` is Ray's default: the less loaded of two random replicas.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from kvsched.bench.common import percentile, provenance, table, write_json
from kvsched.core.routing import RouterConfig, SessionRouter
from kvsched.core.routing_ring import SlotName, slot_name

POLICIES = ("kvsched", "consistent_hash", "pow2")


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("router", help="session routing: kvsched vs consistent "
                                                       "hashing vs power-of-two, simulated fleet", description=__doc__)
    p.add_argument("--quick", action="store_true", help="8 and 32 replicas, fewer turns (seconds)")
    p.add_argument("--replicas", type=int, nargs="+", default=None, help="fleet sizes (default 8 16 32 64; quick 8 32)")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--turns", type=int, default=None, help="turns per fleet size (default 200k; quick 40k)")
    p.add_argument("--load-factor", type=float, default=1.25, help="kvsched's c: no replica above c x the average")
    p.add_argument("--in-flight-per-replica", type=float, default=64.0,
                   help="turns in flight per replica on average (a GPU replica batches 64-256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action="store_true",
                   help="also a real run: a local Ray cluster, 2 CPU replicas of the tiny model, each router in turn")
    p.add_argument("--real-sessions", type=int, default=12)
    p.add_argument("--real-turns", type=int, default=4)
    p.add_argument("--migration-only", action="store_true",
                   help="with --real: only the migration scenario (kvsched.bench.router_migration), not the routers")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=run)


@dataclass(frozen=True, slots=True)
class SimConfig:
    replicas: int
    sessions: int = 10_000
    turns: int = 40_000
    load_factor: float = 1.25
    in_flight_per_replica: float = 64.0
    pareto_alpha: float = 1.2
    turn_sigma: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.replicas < 2 or self.sessions < 1 or self.turns < 100:
            raise ValueError("need replicas >= 2, sessions >= 1 and turns >= 100")


# ---- policies under test -------------------------------------------------------------------------------------
class Policy(Protocol):
    name: str

    def set_live(self, slots: list[SlotName], revived: SlotName | None = None) -> None: ...
    def route(self, session: str, loads: dict[SlotName, int], holder: SlotName | None) -> SlotName: ...


class KVSchedPolicy:
    name = "kvsched"

    def __init__(self, load_factor: float) -> None:
        self.router = SessionRouter(RouterConfig(load_factor=load_factor))

    def set_live(self, slots: list[SlotName], revived: SlotName | None = None) -> None:
        self.router.set_live(slots)

    def route(self, session: str, loads: dict[SlotName, int], holder: SlotName | None) -> SlotName:
        d = self.router.route(session, loads, (holder,) if holder is not None else ())
        self.router.record(d)
        return d.slot

    def peek(self, session: str, holder: SlotName | None) -> SlotName:
        return self.router.route(session, {}, (holder,) if holder is not None else ()).slot


def _mmh3_64() -> Callable[[bytes], int]:
    try:
        import mmh3

        return lambda b: int(mmh3.hash64(b, seed=0xF9B4CA77, signed=False)[0])
    except ImportError:  # ray[serve] brings mmh3; without it the ring is the same shape on another hash
        from kvsched.core.routing_ring import hash64

        return lambda b: hash64(b.decode())


class ConsistentHashPolicy:
    """Ray's experimental ConsistentHashRouter: ring on unique ids, no load bound, fallbacks only at the cap."""

    name = "consistent_hash"

    def __init__(self, max_ongoing: int, rng: random.Random) -> None:
        self.hash = _mmh3_64()
        self.max_ongoing = max_ongoing
        self.rng = rng
        self.unique: dict[SlotName, str] = {}
        self._points: list[int] = []
        self._owners: list[SlotName] = []

    def set_live(self, slots: list[SlotName], revived: SlotName | None = None) -> None:
        for s in slots:
            if s not in self.unique or s == revived:
                self.unique[s] = f"{self.rng.getrandbits(32):08x}"  # a replacement is a new actor, a new id
        pairs = sorted((self.hash(f"{self.unique[s]}:{i}".encode()), s) for s in slots for i in range(100))
        self._points = [p for p, _ in pairs]
        self._owners = [s for _, s in pairs]

    def _ranked(self, session: str) -> list[SlotName]:
        n = len(self._points)
        start = bisect.bisect_right(self._points, self.hash(session.encode())) % n
        out: list[SlotName] = []
        for k in range(n):
            s = self._owners[(start + k) % n]
            if s not in out:
                out.append(s)
                if len(out) == 3:
                    break
        return out

    def route(self, session: str, loads: dict[SlotName, int], holder: SlotName | None) -> SlotName:
        ranked = self._ranked(session)
        for s in ranked:
            if loads.get(s, 0) < self.max_ongoing:
                return s
        return ranked[0]  # every candidate full: Ray backs off and retries the primary

    def peek(self, session: str, holder: SlotName | None) -> SlotName:
        return self._ranked(session)[0]


class PowerOfTwoPolicy:
    name = "pow2"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.live: list[SlotName] = []

    def set_live(self, slots: list[SlotName], revived: SlotName | None = None) -> None:
        self.live = list(slots)

    def route(self, session: str, loads: dict[SlotName, int], holder: SlotName | None) -> SlotName:
        if len(self.live) < 2:
            return self.live[0]
        a, b = self.rng.sample(self.live, 2)
        la, lb = loads.get(a, 0), loads.get(b, 0)
        return a if la < lb or (la == lb and self.rng.random() < 0.5) else b

    def peek(self, session: str, holder: SlotName | None) -> SlotName:
        return self.rng.choice(self.live)


def make_policy(name: str, cfg: SimConfig) -> Any:
    rng = random.Random(cfg.seed + 1)
    if name == "kvsched":
        return KVSchedPolicy(cfg.load_factor)
    if name == "consistent_hash":
        return ConsistentHashPolicy(max(1, round(4 * cfg.in_flight_per_replica)), rng)
    if name == "pow2":
        return PowerOfTwoPolicy(rng)
    raise ValueError(f"unknown policy {name!r}")


# ---- the fleet simulation -------------------------------------------------------------------------------------
@dataclass
class Workload:
    """Seeded sessions: ids, turn rates and every turn's length, identical for every policy."""

    ids: list[str]
    rates: list[float]
    seed: int

    @classmethod
    def build(cls, cfg: SimConfig) -> Workload:
        rng = random.Random(cfg.seed)
        weights = [rng.paretovariate(cfg.pareto_alpha) for _ in range(cfg.sessions)]
        mean_turn = 1.0
        # about in_flight_per_replica * replicas turns in flight: sum of rates * mean turn length
        scale = cfg.in_flight_per_replica * cfg.replicas / (sum(weights) * mean_turn)
        ids = [f"wf{i // 5}/agent-{i % 5}" for i in range(cfg.sessions)]
        return cls(ids, [w * scale for w in weights], cfg.seed)


def simulate(policy: Any, cfg: SimConfig, work: Workload) -> dict[str, Any]:
    rng = random.Random(cfg.seed + 7)  # the same arrivals and turn lengths for every policy
    n = cfg.replicas
    slots = [slot_name(i) for i in range(n)]
    policy.set_live(slots)
    live = set(slots)
    loads: dict[SlotName, int] = {s: 0 for s in slots}
    holder: dict[int, SlotName] = {}  # session index -> replica holding its KV
    incarnation = {s: 0 for s in slots}
    in_flight: dict[int, tuple[SlotName, int]] = {}
    events: list[tuple[float, int, int, int]] = []  # (time, seq, kind 0=arrive 1=done, session)
    seq = 0
    for i, r in enumerate(work.rates):
        heapq.heappush(events, (rng.expovariate(r), seq, 0, i))
        seq += 1
    lengths = [rng.lognormvariate(-cfg.turn_sigma ** 2 / 2, cfg.turn_sigma) for _ in range(cfg.turns + 4096)]
    phase_ends = {"warmup": cfg.turns // 10, "steady": cfg.turns // 2, "outage": cfg.turns * 7 // 10}
    served = 0
    hits = follow_ups = 0
    route_ns: list[int] = []
    work_done = {s: 0.0 for s in slots}
    spread: list[float] = []
    moves: dict[str, Any] = {}
    victim = slots[n // 2]
    now = 0.0

    def kv_at(i: int) -> SlotName | None:
        """Where session i's KV is: the replica running its turn, else the one that ran its last turn."""
        at = in_flight[i][0] if i in in_flight else holder.get(i)
        return at if at in live else None

    def snapshot() -> list[SlotName]:
        return [policy.peek(work.ids[i], kv_at(i)) for i in range(len(work.ids))]

    while served < cfg.turns and events:
        now, _, kind, i = heapq.heappop(events)
        if kind == 1:
            at = in_flight.get(i)
            if at is None or at[1] != incarnation[at[0]]:
                continue  # the turn died with its replica and was retried
            del in_flight[i]
            loads[at[0]] -= 1
            holder[i] = at[0]
            heapq.heappush(events, (now + rng.expovariate(work.rates[i]), seq, 0, i))
            seq += 1
            continue
        kv = holder.get(i)
        kv = kv if kv in live else None
        t0 = time.perf_counter_ns()
        slot = policy.route(work.ids[i], loads, kv)
        route_ns.append(time.perf_counter_ns() - t0)
        if i in holder:
            follow_ups += 1
            hits += slot == holder[i]
        length = lengths[served]
        served += 1
        loads[slot] += 1
        in_flight[i] = (slot, incarnation[slot])
        heapq.heappush(events, (now + length, seq, 1, i))
        seq += 1
        if phase_ends["warmup"] <= served < phase_ends["steady"]:
            work_done[slot] += length
            mean = sum(loads.values()) / len(live)
            spread.append(max(loads.values()) / mean if mean else 1.0)
        if served == phase_ends["steady"]:  # kill one replica: its in-flight turns are retried at once
            before = snapshot()
            live.discard(victim)
            incarnation[victim] += 1
            for j, (s, _) in list(in_flight.items()):
                if s == victim:
                    del in_flight[j]
                    heapq.heappush(events, (now, seq, 0, j))
                    seq += 1
            loads[victim] = 0
            del loads[victim]
            for j in [j for j, s in holder.items() if s == victim]:
                del holder[j]  # its KV is gone
            policy.set_live(sorted(live))
            after = snapshot()
            moved = [j for j in range(len(before)) if before[j] != after[j]]
            moves.update(before_kill=before, moved_on_kill=len(moved) / len(before),
                         kill_moved_others=sum(before[j] != victim for j in moved))
        if served == phase_ends["outage"]:  # the replica returns (kvsched: same slot; Ray: a new unique id)
            before = snapshot()
            live.add(victim)
            loads[victim] = 0
            policy.set_live(sorted(live), revived=victim)
            after = snapshot()
            owned = [j for j in range(len(before)) if moves["before_kill"][j] == victim]
            moves.update(returned_home=sum(after[j] == victim for j in owned) / max(1, len(owned)),
                         return_moved_others=sum(1 for j in range(len(before)) if before[j] != after[j]
                                                 and moves["before_kill"][j] != victim))
    before = snapshot()
    grown = slot_name(n)
    live.add(grown)
    loads[grown] = 0
    policy.set_live(sorted(live))
    after = snapshot()
    mean_work = sum(work_done.values()) / n
    return {
        "affinity": hits / follow_ups if follow_ups else None,
        "max_over_mean_load": max(work_done.values()) / mean_work if mean_work else None,
        "max_over_mean_in_flight_p99": percentile(spread, 0.99),
        "moved_on_kill": moves.get("moved_on_kill"),
        "moved_on_scale_up": sum(a != b for a, b in zip(before, after, strict=True)) / len(before),
        "route_us_p50": (percentile(route_ns, 0.5) or 0.0) / 1000,
        "route_us_p99": (percentile(route_ns, 0.99) or 0.0) / 1000,
        "kill_return": {"dead_replica_sessions": sum(s == victim for s in moves.get("before_kill", [])),
                        "others_moved_on_kill": moves.get("kill_moved_others"),
                        "dead_replica_sessions_back_home": moves.get("returned_home"),
                        "others_moved_on_return": moves.get("return_moved_others")},
        "turns": served, "follow_ups": follow_ups,
    }


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    sizes = args.replicas or ([8, 32] if args.quick else [8, 16, 32, 64])
    turns = args.turns or (40_000 if args.quick else 200_000)
    by_size: dict[str, dict[str, Any]] = {}
    for n in sizes:
        cfg = SimConfig(replicas=n, sessions=args.sessions, turns=turns, load_factor=args.load_factor,
                        in_flight_per_replica=args.in_flight_per_replica, seed=args.seed)
        work = Workload.build(cfg)
        by_size[str(n)] = {"config": asdict(cfg)} | {p: simulate(make_policy(p, cfg), cfg, work) for p in POLICIES}
    headline = by_size[str(max(sizes))]
    out = {**{p: headline[p] for p in POLICIES}, "headline_replicas": max(sizes), "by_replicas": by_size,
           "gates": gates(by_size, args.load_factor), "provenance": provenance()}
    if args.real:
        from kvsched.adapters.ray.loadtest import real_run
        from kvsched.bench.router_migration import migration_run

        if not args.migration_only:
            out["real_2_replicas"] = real_run(args.real_sessions, args.real_turns, args.seed)
        out["migration"] = migration_run(seed=args.seed)
        out["gates"].update({f"migration_{k}": v for k, v in out["migration"]["gates"].items()})
    return out


def gates(by_size: dict[str, dict[str, Any]], load_factor: float) -> dict[str, bool]:
    """The issue's done-when checks, at every fleet size of the run."""
    out: dict[str, bool] = {}
    for n, row in by_size.items():
        k, ch = row["kvsched"], row["consistent_hash"]
        kr = k["kill_return"]
        out[f"n{n}_kvsched_affinity_ge_0.95"] = k["affinity"] >= 0.95
        out[f"n{n}_kvsched_max_over_mean_le_{load_factor}"] = k["max_over_mean_load"] <= load_factor
        out[f"n{n}_consistent_hash_max_over_mean_higher"] = ch["max_over_mean_load"] > k["max_over_mean_load"]
        out[f"n{n}_kill_moves_only_dead_replica_sessions"] = (kr["others_moved_on_kill"] == 0
                                                               and kr["dead_replica_sessions"] > 0)
        out[f"n{n}_return_moves_them_back_and_nobody_else"] = (kr["dead_replica_sessions_back_home"] == 1.0
                                                                and kr["others_moved_on_return"] == 0)
    return out


def run(args: argparse.Namespace) -> int:
    result = run_benchmark(args)
    rows = []
    for n, row in result["by_replicas"].items():
        for p in POLICIES:
            r = row[p]
            kr = r["kill_return"]
            rows.append([n, p, r["affinity"], r["max_over_mean_load"], r["max_over_mean_in_flight_p99"],
                         r["moved_on_kill"], kr["others_moved_on_kill"], kr["dead_replica_sessions_back_home"],
                         r["moved_on_scale_up"], r["route_us_p50"]])
    print(table(rows, ["replicas", "policy", "affinity", "max/mean work", "max/mean in-flight p99", "moved on kill",
                       "others moved", "back home", "moved on scale-up", "route us p50"]))
    if "real_2_replicas" in result:
        real = result["real_2_replicas"]
        print(f"real run: {real['config']}")
        print(table([[p, r["affinity"], r["max_over_mean_load"], r["follow_up_ttft_ms_p50"],
                      r["follow_up_ttft_ms_p95"], r["errors"]] for p, r in real["policies"].items()],
                    ["policy", "affinity", "max/mean requests", "follow-up TTFT ms p50", "p95", "errors"]))
    if "migration" in result:
        from kvsched.bench.router_migration import print_migration

        print_migration(result["migration"])
    for gate, ok in result["gates"].items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {gate}")
    write_json(args.out, result)
    return 0 if all(result["gates"].values()) else 1
