"""What tools/soak_ray.py watches while its sessions run through `kvsched ray-serve`: which replica answered each turn
(`Placements`, fed by soak_clients.Target.observe), the replicas and their engines' load (`Monitor`), and the losses
it causes (`Killer`: an engine's `vllm serve`, then a replica actor, SIGKILLed as tests/ray's kill tests do). A
script's module, beside tools/soak_ray.py."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

LOSS_GRACE_S = 30.0  # a 5xx this long after a loss (or before its replacement joined) is the loss's, if it says why


@dataclass
class Seen:
    t: float
    replica_id: str
    slot: str
    attempts: int


@dataclass
class Placements:
    """Every answered turn's replica per session key (as the ingress and routers key sessions: owners.session_key),
    the losses, and the 5xx answered meanwhile."""
    t0: float = field(default_factory=time.monotonic)
    turns: dict[str, list[Seen]] = field(default_factory=dict)
    losses: list[dict[str, Any]] = field(default_factory=list)  # {kind, t, replica_id, slot, joined_t}
    counts: Counter[str] = field(default_factory=Counter)
    per_replica: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def observe(self, payload: dict[str, Any], headers: dict[str, str], r: Any) -> bool:
        """soak_clients.Target.observe: a 200's replica recorded; a 5xx with a message near a loss is expected."""
        from kvsched.adapters.ray.owners import session_key

        now = self.now()
        low = {k.lower(): v for k, v in headers.items()}
        sid = low.get("x-session-id")
        with self.lock:
            if r.status_code == 200:
                rid, slot = r.headers.get("x-kvsched-replica-id", "?"), r.headers.get("x-kvsched-replica", "?")
                attempts = int(r.headers.get("x-kvsched-attempts", "1"))
                self.counts["answered"] += 1
                self.counts["retried"] += attempts > 1
                self.per_replica[rid] += 1
                if sid is not None:
                    key = session_key(sid, low, payload.get("cache_salt"), True)
                    self.turns.setdefault(key, []).append(Seen(now, rid, slot, attempts))
                return False
            if r.status_code < 500:
                return False
            message = _message(r.text)
            near = any(loss["t"] <= now <= (loss.get("joined_t") or math.inf) + LOSS_GRACE_S for loss in self.losses)
            self.counts[f"status_{r.status_code}{'_at_loss' if near and message else ''}"] += 1
            self.errors.append({"t": round(now, 2), "status": r.status_code, "message": message[:300],
                                "near_loss": near, "session": sid})
            return near and bool(message)

    def moves(self, router_moves: dict[str, list[str]]) -> dict[str, Any]:
        """Each session's moves between replicas, judged: off a lost replica after its loss (failover); back to a
        replacement for a session that failed over (return) or any move the router logged with its reason
        (overflow: the load bound, kv, return); anything else breaks "a session stays on its replica between losses"."""
        dead = {loss["replica_id"]: loss["t"] for loss in self.losses}
        out: Counter[str] = Counter()
        bad: list[dict[str, Any]] = []
        with self.lock:
            for key, seen in self.turns.items():
                failed_over = False
                for a, b in zip(seen, seen[1:], strict=False):
                    if a.replica_id == b.replica_id:
                        out["stayed"] += 1
                        continue
                    if a.replica_id in dead and b.t >= dead[a.replica_id]:
                        kind, failed_over = "failover", True
                    elif failed_over and "return" in router_moves.get(key, []):
                        kind = "return"
                    elif reasons := [x for x in router_moves.get(key, []) if x in ("overflow", "kv", "return")]:
                        kind = reasons[0]
                    else:
                        kind = "unexplained"
                        bad.append({"session": key, "from": a.slot, "to": b.slot, "at_s": round(b.t, 2),
                                    "router_logged": router_moves.get(key, [])})
                    out[f"moved_{kind}"] += 1
        return {"counts": dict(out), "unexplained": bad[:20]}


def _message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return ""
    return str(err.get("message", "")) if isinstance(err, dict) else str(err or "")


# (.+?): a key holds \x1f between the id and its owner (owners.session_key), which \S refuses
MOVE_LINE = re.compile(r"kvsched router: session (.+?) moved \S+ -> \S+ \((\w+),")


def router_moves(log_dir: Path) -> dict[str, list[str]]:
    """Session key -> the reasons of its moves, from the ingress replicas' logs (the router logs every move)."""
    out: dict[str, list[str]] = {}
    for f in sorted(log_dir.glob("replica_*_ingress_*.log")):
        for m in MOVE_LINE.finditer(f.read_text(errors="replace")):
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


class Monitor:
    """Polls the ingress's replica list (admin) and each live engine's load (vLLM's running + waiting requests) every
    `period_s`: the replicas seen, and samples where one engine held more than the router's bound allows
    (max(load_floor, ceil(c * L / n)), L the live engines' sum; a sample, not the router's own count: `slack` more)."""

    def __init__(self, base: str, admin: str, load_factor: float, load_floor: int, slack: int = 2,
                 period_s: float = 1.0) -> None:
        self.base, self.auth = base, {"Authorization": f"Bearer {admin}"}
        self.load_factor, self.load_floor, self.slack, self.period_s = load_factor, load_floor, slack, period_s
        self.replicas: dict[str, dict[str, Any]] = {}  # replica id -> its last description
        self.samples = 0
        self.max_load: Counter[str] = Counter()
        self.over_bound: list[dict[str, Any]] = []
        self.store_samples: list[tuple[float, str, dict[str, float]]] = []  # (monotonic, replica id, STORE_COUNTERS)
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def live(self) -> list[dict[str, Any]]:
        r = httpx.get(self.base + "/kvsched/replicas", headers=self.auth, timeout=30)
        r.raise_for_status()
        out = list(r.json()["replicas"])
        with self.lock:
            for rep in out:
                self.replicas[rep["replica_id"]] = rep
        return out

    def run(self) -> None:
        from kvsched.adapters.ray.stats import read_metrics

        while not self.stop.wait(self.period_s):
            try:
                reps = [r for r in self.live() if r["engine_alive"]]
                loads, stored = {}, {}
                for rep in reps:
                    text = httpx.get(rep["engine_url"] + "/metrics", timeout=10).text
                    g = read_metrics(text).gauges
                    loads[rep["replica_id"]] = int(g.get("vllm:num_requests_running", 0)
                                                   + g.get("vllm:num_requests_waiting", 0))
                    stored[rep["replica_id"]] = store_counters(text)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.errors[type(exc).__name__] += 1  # a replica dying between the list and its /metrics
                continue
            if not loads:
                continue
            bound = max(self.load_floor, math.ceil(self.load_factor * sum(loads.values()) / len(loads)))
            with self.lock:
                self.samples += 1
                now = time.monotonic()
                self.store_samples.extend((now, rid, c) for rid, c in stored.items())
                for rid, n in loads.items():
                    self.max_load[rid] = max(self.max_load[rid], n)
                    if n > bound + self.slack:
                        self.over_bound.append({"replica_id": rid, "load": n, "bound": bound, "loads": loads})

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"samples": self.samples, "max_load": dict(self.max_load), "over_bound": self.over_bound[:20],
                    "over_bound_count": len(self.over_bound), "poll_errors": dict(self.errors),
                    "replicas_seen": {rid: {k: r.get(k) for k in ("slot", "replica_pid", "engine_pid")}
                                      for rid, r in self.replicas.items()}}


# An engine's /metrics series that say whether a session moved to it found its KV in the shared store (kvsched's
# adapters/vllm/metrics.py): sessions whose first request here had last been served by another replica per the
# store's session record (written at each turn's end, beside its blocks), those of them whose KV was read from the
# store, the blocks read, and whether the store was up
STORE_COUNTERS = ("kvsched_moved_sessions_total", "kvsched_moved_sessions_restored_total",
                  "kvsched_shared_tier_restored_blocks_total", "kvsched_store_up")


def store_counters(text: str) -> dict[str, float]:
    """STORE_COUNTERS' values in an engine's /metrics page (absent: no store configured)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in STORE_COUNTERS:
            try:
                out[name] = float(value.split()[0])
            except (ValueError, IndexError):
                pass
    return out


def failovers(placements: Placements) -> list[dict[str, Any]]:
    """Each session's failover (Placements.moves' rule: its turn after a loss answered by another replica than the
    lost one that answered its turn before): the session, the lost replica, the replica that took it, when."""
    dead = {loss["replica_id"]: loss["t"] for loss in placements.losses}
    out = []
    with placements.lock:
        for key, seen in placements.turns.items():
            for a, b in zip(seen, seen[1:], strict=False):
                if a.replica_id != b.replica_id and a.replica_id in dead and b.t >= dead[a.replica_id]:
                    out.append({"session": key, "lost": a.replica_id, "to": b.replica_id, "t": b.t})
    return out


def store_failovers(losses: list[dict[str, Any]], moved: list[dict[str, Any]],
                    samples: list[tuple[float, str, dict[str, float]]], end_t: float) -> list[dict[str, Any]]:
    """For each loss: did the sessions that failed over off it find their KV in the shared store? Times are
    Placements' (seconds from its t0). On the replicas that took them, between the loss and the next loss (or
    `end_t`), from each one's last sample before the loss: the rise of kvsched_moved_sessions (moved sessions whose
    record the store held), kvsched_moved_sessions_restored and kvsched_shared_tier_restored_blocks (KV read from the
    store). Verdict per loss: "hit" if either of the last two rose; "none moved" (no session failed over); "not
    written" if the moved sessions' KV never reached the store, told by the lost replica's last sample before the
    loss showing the store down (kvsched_store_up 0), or by no rise of kvsched_moved_sessions (the store held no
    record naming another replica for any session that arrived: the record is written at a turn's end beside the
    turn's blocks, while the store is up); "unseen" if no sample of those replicas came after the loss; else "miss",
    a failure: the moved sessions' records were in the store and none of their KV was read from it."""
    out = []
    ordered = sorted(losses, key=lambda loss: loss["t"])
    for i, loss in enumerate(ordered):
        until = ordered[i + 1]["t"] if i + 1 < len(ordered) else end_t
        took = sorted({m["to"] for m in moved if m["lost"] == loss["replica_id"] and loss["t"] <= m["t"] < until})
        row: dict[str, Any] = {"kind": loss["kind"], "slot": loss.get("slot"), "t": round(loss["t"], 1),
                               "sessions_moved": sum(1 for m in moved if m["lost"] == loss["replica_id"]
                                                     and loss["t"] <= m["t"] < until), "to": took}
        lost_before = [c for t, rid, c in samples if rid == loss["replica_id"] and t < loss["t"]]
        row["lost_store_up"] = lost_before[-1].get("kvsched_store_up") if lost_before else None
        rise: Counter[str] = Counter()
        seen_after = False
        for rid in took:
            before = [c for t, r, c in samples if r == rid and t < loss["t"]]
            after = [c for t, r, c in samples if r == rid and loss["t"] <= t < until]
            if not after:
                continue
            seen_after = True
            for name in STORE_COUNTERS[:3]:
                rise[name] += after[-1].get(name, 0.0) - (before[-1].get(name, 0.0) if before else 0.0)
        row["rise"] = {k.removeprefix("kvsched_").removesuffix("_total"): v for k, v in rise.items()}
        if not took:
            row["verdict"] = "none moved"
        elif not seen_after:
            row["verdict"] = "unseen"
        elif rise["kvsched_moved_sessions_restored_total"] > 0 or rise["kvsched_shared_tier_restored_blocks_total"] > 0:
            row["verdict"] = "hit"
        elif row["lost_store_up"] == 0 or rise["kvsched_moved_sessions_total"] <= 0:
            row["verdict"] = "not written"
        else:
            row["verdict"] = "miss"
        out.append(row)
    return out


def group_alive(pgid: int) -> bool:
    from kvsched.bench.router_real import group_members

    return bool(group_members(pgid))


class Killer:
    """At `engine_at_s`: SIGKILL slot 0's `vllm serve` (its process group's leader); at `actor_at_s` (and once that
    replacement joined): SIGKILL slot 1's replica actor. Each loss recorded in `placements` with when its replacement
    joined (a new replica id in the slot, its engine alive) and whether the dead engine's processes were gone 10 s
    after the kill (the reaper's job for a dead actor)."""

    def __init__(self, monitor: Monitor, placements: Placements, engine_at_s: float | None, actor_at_s: float | None,
                 join_timeout_s: float = 400.0) -> None:
        self.monitor, self.placements = monitor, placements
        self.plan = [("engine", 0, engine_at_s), ("actor", 1, actor_at_s)]
        self.join_timeout_s = join_timeout_s
        self.error: str | None = None

    def run(self) -> None:
        try:
            for kind, slot, at in self.plan:
                if at is None:
                    continue
                while self.placements.now() < at and not self.monitor.stop.is_set():
                    time.sleep(0.2)
                if self.monitor.stop.is_set():
                    return
                self.kill(kind, slot)
        except Exception as exc:  # noqa: BLE001 - the report's
            self.error = f"{type(exc).__name__}: {exc}"

    def kill(self, kind: str, slot: int, wait_s: float = 60.0) -> None:
        """The slot's replica with its engine running (a listed `engine_pid` whose engine is gone may be another
        process's number by now: found by review71, it was SIGKILLed whatever its state; waited for up to `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while (victim := next((r for r in self.monitor.live() if r["slot"] == slot and r["engine_alive"]), None)) \
                is None:
            if time.monotonic() > deadline or self.monitor.stop.wait(1.0):
                raise RuntimeError(f"no replica in slot {slot} with its engine running to kill ({kind})")
        pid = int(victim["engine_pid"] if kind == "engine" else victim["replica_pid"])
        engine_group = int(victim["engine_pid"])
        loss: dict[str, Any] = {"kind": kind, "slot": slot, "replica_id": victim["replica_id"], "pid": pid}
        os.kill(pid, signal.SIGKILL)
        loss["t"] = self.placements.now()
        with self.placements.lock:
            self.placements.losses.append(loss)
        t_kill = time.monotonic()
        while time.monotonic() < t_kill + 10 and group_alive(engine_group):
            time.sleep(0.2)
        loss["engine_processes_left_10s"] = group_alive(engine_group)
        while time.monotonic() < t_kill + self.join_timeout_s:
            try:
                fresh = [r for r in self.monitor.live() if r["slot"] == slot and r["engine_alive"]
                         and r["replica_id"] != victim["replica_id"]]
            except (httpx.HTTPError, ValueError, KeyError):
                fresh = []
            if fresh:
                loss.update(joined_t=self.placements.now(), replacement=fresh[0]["replica_id"])
                loss["join_s"] = round(loss["joined_t"] - loss["t"], 1)
                return
            time.sleep(1.0)
        raise TimeoutError(f"no replacement took slot {slot} within {self.join_timeout_s:g} s of the {kind} kill")
