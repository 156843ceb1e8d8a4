"""How long does the shared store's lookup at a request's arrival hold vLLM's scheduler thread?

At each arrival the FP8 tier's shared level reads the session's metadata (GET) and which of the prefix's blocks the
store holds (a pipelined EXISTS) (docs/shared_store.md). Before, both ran inline on the scheduler thread: every
running request's step waited for the store's round trips. Now they run inline only while they are fast
(`kvsched.core.store_health.ReadCost`), else on a lookup thread, the request waiting for the answer. Measured here in
one run, the real `TierLevels` against a real `redis-server` (loopback), straight or behind a proxy that delays every
packet from the client by a fixed time (a store across a network; the proxy itself, Python asyncio, adds ~1 ms a
round trip), for each delay and both ways:
- `inline` (before): every read on the scheduler thread (`ReadCost` that never leaves it);
- `hybrid` (now): the defaults.
Per arrival: the scheduler thread's time in `promote` and its share of the step's `poll` and second `promote`; the
steps until the store's blocks were planned (0: at the arrival); the blocks planned from the store (the same on both
sides: the lookup thread loses nothing). Steps are stand-ins: `--step-ms` of sleep (a GPU step, the GIL free).

    python benchmarks/store_lookup_step.py --out benchmarks/results/store_lookup_step.json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from store_probe import free_port, running, wait_port  # noqa: E402

from kvsched.adapters.vllm.tier_levels import TierLevels  # noqa: E402
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig  # noqa: E402
from kvsched.bench.common import provenance, write_json  # noqa: E402
from kvsched.bench.delay_proxy import delayed  # noqa: E402
from kvsched.bench.plots import line_chart, save_beside  # noqa: E402
from kvsched.core.sessions import SessionKey  # noqa: E402
from kvsched.core.shared_state import SessionMeta, block_key, session_key  # noqa: E402
from kvsched.core.store_health import ReadCost  # noqa: E402

IDENT = "ab" * 16
CHAIN = 32  # blocks of each request's prefix past what the pool holds
HELD = 16  # of them, the store holds the first HELD for every other session (a moved session)


class Host:
    """A host tier that holds nothing and gives every admitted key a slot."""

    def match(self, chain: Any, start: int, n: int) -> list[Any]:
        return []

    def admit(self, owner: Any, keys: list[bytes]) -> list[tuple[bytes, int]]:
        return [(k, i) for i, k in enumerate(keys)]

    def hold(self, slots: list[int]) -> None:
        pass


def chain_of(i: int) -> list[bytes]:
    return [(i * CHAIN + j).to_bytes(8, "big") * 4 for j in range(CHAIN)]


def publish(client: Any, sessions: int) -> None:
    client.flushall()
    for i in range(0, sessions, 2):
        client.mset({block_key(IDENT, k, 0): b"x" for k in chain_of(i)[:HELD]})
        meta = SessionMeta(role=None, ttl_s=None, turns=1, replica="a", blocks=HELD).encode()
        client.set(session_key(IDENT, f"s{i}", None, None), meta)


def one_side(url: str, sessions: int, per_step: int, step_s: float, hybrid: bool) -> dict[str, Any]:
    lv = TierLevels(LevelsConfig(store_url=url, replica="b"), IDENT, {}, 1024, 1)
    if not hybrid:
        lv.read_cost = ReadCost(inline_s=math.inf, step_budget_s=math.inf)
    host = Host()
    spent = [0.0] * sessions  # the scheduler thread's time per arrival
    arrived_step: dict[str, int] = {}
    planned_step: dict[str, int] = {}
    planned = 0
    inline = 0
    step = 0
    i = 0
    while i < sessions or (lv.lookups is not None and lv.lookups.pending):
        for _ in range(per_step if i < sessions else 0):
            rid = f"r{i}"
            t = time.perf_counter()
            n = lv.promote(SessionKey(f"s{i}"), chain_of(i), 0, CHAIN, host, rid)
            spent[i] += time.perf_counter() - t
            arrived_step[rid] = step
            if lv.lookups is None or not lv.lookups.waiting(rid):
                inline += 1
                planned_step[rid] = step
            planned += n
            i += 1
            if i == sessions:
                break
        time.sleep(step_s)  # the engine's step; the lookup thread runs meanwhile
        step += 1
        t = time.perf_counter()
        answered = lv.poll()
        poll_s = time.perf_counter() - t
        for rid in answered:
            j = int(rid[1:])
            t = time.perf_counter()
            planned += lv.promote(SessionKey(f"s{j}"), chain_of(j), 0, CHAIN, host, rid)
            spent[j] += time.perf_counter() - t + poll_s / len(answered)
            planned_step[rid] = step
        lv.take_ops()
    if lv.lookups is not None:
        lv.lookups.close()
    waited = [planned_step[r] - arrived_step[r] for r in arrived_step if r in planned_step]
    ms = sorted(x * 1000 for x in spent)
    return {"mode": "hybrid" if hybrid else "inline", "arrivals": sessions,
            "sched_ms_per_arrival": {"mean": round(statistics.fmean(ms), 3), "median": round(statistics.median(ms), 3),
                                     "p99": round(ms[int(0.99 * (len(ms) - 1))], 3), "max": round(ms[-1], 3)},
            "sched_ms_per_step": round(sum(ms) / max(step, 1), 3), "steps": step,
            "read_inline": inline, "steps_to_plan_mean": round(statistics.fmean(waited), 3) if waited else 0.0,
            "not_planned": sessions - len(waited),
            "store_blocks_planned": planned, "moved_sessions": int(lv.counters["moved_sessions"]),
            "store_read_mean_ms": round(lv.read_cost.mean_s * 1000, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--delay-ms", type=float, action="append", default=None,
                   help="one-way delay added to the store's requests (default 0: no proxy, 0.25, 1, 4, 16)")
    p.add_argument("--sessions", type=int, default=200, help="arrivals per side and delay (each a new session)")
    p.add_argument("--per-step", type=int, default=4, help="arrivals per scheduler step")
    p.add_argument("--step-ms", type=float, default=10.0, help="the stand-in engine step (sleep)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.sessions < 1 or args.per_step < 1 or args.step_ms < 0:
        p.error("--sessions and --per-step must be positive, --step-ms not negative")
    exe = shutil.which("redis-server")
    if exe is None:
        print("store_lookup_step: needs redis-server (apt-get install -y redis-server)", file=sys.stderr)
        return 2
    import redis

    port = free_port()
    rows = []
    with running([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]):
        wait_port(port)
        client = redis.Redis(host="127.0.0.1", port=port)
        for delay in args.delay_ms or [0.0, 0.25, 1.0, 4.0, 16.0]:
            with delayed(port, delay / 1000) if delay > 0 else contextlib.nullcontext(port) as store_port:
                row: dict[str, Any] = {"delay_ms": delay}
                for hybrid in (False, True):
                    publish(client, args.sessions)
                    side = one_side(f"redis://127.0.0.1:{store_port}/0", args.sessions, args.per_step,
                                    args.step_ms / 1000, hybrid)
                    row[side["mode"]] = side
                rows.append(row)
            a, b = row["inline"], row["hybrid"]
            print(f"delay {delay} ms: scheduler thread per arrival, mean / p99: inline "
                  f"{a['sched_ms_per_arrival']['mean']} / {a['sched_ms_per_arrival']['p99']} ms, hybrid "
                  f"{b['sched_ms_per_arrival']['mean']} / {b['sched_ms_per_arrival']['p99']} ms; steps to plan "
                  f"{a['steps_to_plan_mean']} / {b['steps_to_plan_mean']}; store blocks planned "
                  f"{a['store_blocks_planned']} / {b['store_blocks_planned']}; read inline {b['read_inline']} of "
                  f"{args.sessions}", flush=True)
    result = {"delays": rows, "config": {"sessions": args.sessions, "per_step": args.per_step,
                                         "step_ms": args.step_ms, "chain_blocks": CHAIN, "held_blocks": HELD,
                                         "read_cost": vars(ReadCost()), "provenance": provenance()}}
    write_json(args.out, result)
    save_beside(args.out, lambda path: plot(rows, path))
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    x = [max(r["delay_ms"], 0.05) for r in rows]
    lines = [(x, [r[mode]["sched_ms_per_arrival"][stat] for r in rows], f"{label}, {stat}", style)
             for mode, label in (("inline", "before: every read inline"), ("hybrid", "now: inline while fast"))
             for stat, style in (("mean", "-"), ("p99", "--"))]
    return line_chart(path, lines, "store delay, ms (one way, added to loopback)", "scheduler thread per arrival, ms",
                      xscale="log", yscale="log")


if __name__ == "__main__":
    sys.exit(main())
