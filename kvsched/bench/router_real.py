"""`kvsched bench router --real`: the routers on a real deployment on this machine. A local Ray cluster on loopback,
two CPU engine replicas of the tiny model (`vllm serve --scheduler kvsched` each) behind kvsched's OpenAI ingress,
the same paced agent sessions (`kvsched.bench.loadgen`) sent through it once per router: kvsched's, then Ray 2.60's
experimental ConsistentHashRouter and its default power-of-two-choices router, each deployed in turn.

Then a kill scenario on kvsched's router: the same sessions, and at `kill_at_s` the `vllm serve` of the replica in
slot-0 is SIGKILLed (as a crashed engine would die). Reported: `requests`, `failed` (answered with an error before
any byte of the answer), `cut_streams` (streams that had started, ended by the OpenAI error event; counted apart),
`retried` (answers that needed more than one attempt), `recovery_s` (kill to the first answer from slot-0's
replacement), `reaped_s` / `orphans_after_10s` (the dead server's processes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvsched.bench.loadgen import LoadConfig, Turn, drive, summarize

ROUTERS = ("kvsched", "consistent_hash", "pow2")


def cluster_config(port: int, marker: str, max_model_len: int = 512) -> Any:
    """Two CPU replicas of the tiny model behind the ingress (`marker`: the vLLM children's served model name)."""
    from kvsched.adapters.ray.config import parse_config

    return parse_config({
        "http": {"host": "127.0.0.1", "port": port}, "router": {"stats_period_s": 1},
        "health_check_period_s": 1,
        "pools": [{"name": "tiny", "model": "kvsched-tiny:test", "models": ["tiny"], "served_model_name": marker,
                   "replicas": 2, "num_cpus": 0, "max_model_len": max_model_len, "block_size": 32,
                   "kv_cache_gib": 1, "max_ongoing_requests": 16}]})


@contextmanager
def local_cluster(port: int) -> Iterator[None]:
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(cfg: Any, router: str) -> float:
    """Deploy the app with `router` (kvsched's or one of Ray's); seconds until every replica is ready."""
    from ray import serve

    from kvsched.adapters.ray.app import BASELINE_ROUTERS, ROUTER_PATH, build_app

    t0 = time.perf_counter()
    serve.run(build_app(cfg, router_path=ROUTER_PATH if router == "kvsched" else BASELINE_ROUTERS[router]),
              name="bench", route_prefix="/")
    return time.perf_counter() - t0


def replicas(base: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(base + "/kvsched/replicas", timeout=30) as r:
        return list(json.loads(r.read())["replicas"])


MOVE_LINE = re.compile(r"kvsched router: session \S+ moved \S+ -> \S+ \((\w+),")


def move_reasons(logs: Path = Path("/tmp/ray/session_latest/logs/serve")) -> dict[str, int]:
    """Why kvsched's router moved sessions, from the newest ingress replica's log (the router logs every move with
    the decision's reason). Best effort: empty when the log is elsewhere."""
    files = sorted(logs.glob("replica_bench_ingress_*.log"), key=lambda f: f.stat().st_mtime)
    if not files:
        return {}
    return dict(Counter(m.group(1) for m in MOVE_LINE.finditer(files[-1].read_text(errors="replace"))))


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.append(int(entry))
    return out


class Killer:
    """Kills slot-0's `vllm serve` at `kill_at_s`, watches its process group go, waits for the replacement, then
    lets the sessions run `after_s` more before they stop."""

    def __init__(self, base: str, load: LoadConfig, kill_at_s: float, after_s: float, timeout_s: float) -> None:
        self.base, self.load, self.kill_at_s, self.after_s, self.timeout_s = base, load, kill_at_s, after_s, timeout_s
        self.victim: dict[str, Any] = {}
        self.kill_s: float | None = None
        self.reaped_s: float | None = None
        self.orphans_after_10s: list[int] | None = None
        self.replaced_s: float | None = None
        self.error: str | None = None

    def __call__(self, t0: float, stopper: Any) -> None:
        try:
            self._run(t0, stopper)
        except Exception as exc:  # noqa: BLE001 - recorded in the result; the sessions stop
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            stopper.stop_at = min(stopper.stop_at, time.monotonic() + self.after_s)

    def _run(self, t0: float, stopper: Any) -> None:
        time.sleep(max(0.0, t0 + self.kill_at_s - time.monotonic()))
        # its engine running: a listed engine_pid whose engine is gone may be another process's number by now (found
        # by review71: it was SIGKILLed whatever the engine's state)
        victim = next((r for r in replicas(self.base) if r["slot"] == 0 and r["engine_alive"]), None)
        if victim is None:
            raise RuntimeError("no replica in slot 0 with its engine running to kill")
        self.victim = victim
        pgid = int(self.victim["engine_pid"])  # vLLM runs in its own session: its pid is the group id
        os.kill(pgid, signal.SIGKILL)
        t_kill = time.monotonic()
        self.kill_s = t_kill - t0
        while time.monotonic() < t_kill + 10.0:
            if self.reaped_s is None and not group_members(pgid):
                self.reaped_s = time.monotonic() - t_kill
            time.sleep(0.2)
        self.orphans_after_10s = group_members(pgid)
        while time.monotonic() < t_kill + self.timeout_s:
            try:
                fresh = [r for r in replicas(self.base) if r["slot"] == 0 and r["engine_alive"]
                         and r["replica_id"] != self.victim["replica_id"]]
            except OSError:
                fresh = []
            if fresh:
                self.replaced_s = time.monotonic() - t_kill
                break
            time.sleep(1.0)

    def report(self, turns: list[Turn]) -> dict[str, Any]:
        kill = self.kill_s if self.kill_s is not None else float("inf")
        back = [t.sent_s for t in turns if t.outcome == "ok" and t.slot == "slot-0" and t.sent_s > kill
                and t.replica_id != self.victim.get("replica_id")]
        return {"kill_at_s": self.kill_s, "error": self.error, "killed": {k: self.victim.get(k) for k in ("slot", "replica_id")},
                "recovery_s": min(back) - kill if back else None, "replacement_ready_s": self.replaced_s,
                "reaped_s": self.reaped_s, "orphans_after_10s": self.orphans_after_10s,
                "failed_turns": [dataclasses.asdict(t) for t in turns if t.outcome != "ok"][:20],
                "timeline": [[round(t.sent_s, 3), t.slot, t.outcome, t.attempts] for t in turns]}


def real_run(load: LoadConfig, routers: tuple[str, ...] = ROUTERS, kill_at_s: float | None = 20.0,
             kill_after_s: float = 20.0, kill_timeout_s: float = 300.0) -> dict[str, Any]:
    """Each router in turn on the same sessions, then the kill scenario on kvsched's (when `kill_at_s` is set)."""
    from ray import serve

    from kvsched.serving import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = cluster_config(port, f"tiny-bench-{uuid.uuid4().hex[:8]}")
    out: dict[str, Any] = {"config": {"replicas": 2, "engine_model": "kvsched-tiny:test", "max_model_len": 512,
                                      "load": dataclasses.asdict(load)}, "policies": {}}
    with local_cluster(port):
        # kvsched's router last: the kill scenario runs on its deployment
        for name in sorted(routers, key=lambda r: r == "kvsched"):
            startup_s = deploy(cfg, name)
            turns, _ = drive(base + "/v1", load)
            row = summarize(turns) | {"startup_s": startup_s}
            if name == "kvsched":
                row["moves"]["reasons"] = move_reasons()
            out["policies"][name] = row
            if name != "kvsched" or kill_at_s is None:
                serve.delete("bench")
        if kill_at_s is not None:
            if "kvsched" not in routers:
                deploy(cfg, "kvsched")
            killer = Killer(base, load, kill_at_s, kill_after_s, kill_timeout_s)
            turns, _ = drive(base + "/v1", dataclasses.replace(load, duration_s=kill_timeout_s + kill_at_s),
                             on_started=killer)
            out["kill"] = summarize(turns) | killer.report(turns)
            serve.delete("bench")
    return out
