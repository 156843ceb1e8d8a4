"""A soak through the Ray path: tools/soak.py's agent sessions (tools/soak_sessions.py: churn, tenants, salts, races,
edits, near-limit prompts) sent through `kvsched ray-serve` (2 replicas of the tiny model on a loopback Ray cluster,
small KV pools and the FP8 tier, a local redis-server as the shared store) and the same turns to a stock `vllm serve`,
every completed turn's text compared as soak.py compares them (`soak.verdict`: greedy, stock's own noise the
tolerance). Mid-run one replica's engine is SIGKILLed, and once its replacement joined, the other replica's actor
(tools/soak_ray_watch.py). Checked: no wrong text (before or after a move), no 5xx but a clean one (with a message)
at a loss, no hang (bounded client timeouts), a session's turns on one replica between losses (moves: failover off a
lost replica, or a move the router logged with its reason), the engines' load within the router's bound, each
replacement joining, and at the end, every session ended, each replica clean (no pin, every block free, the tier
empty: soak.settle on each engine's admin routes) and still answering as stock does; and the sessions that failed over
off a loss finding their KV in the shared store (soak_ray_watch.store_failovers).

    flock /tmp/kv/heavy.lock .venv/bin/python tools/soak_ray.py --minutes 8 --sessions 6 --out /tmp/soak_ray.json

tests/ray/test_soak_ray.py runs `soak_ray` for a few seconds against a running deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the soak's modules (a script's siblings)
from soak import ADMIN, cpu, settle, tenant_keys, verdict  # noqa: E402
from soak_clients import Log, Target, Until, bad_requests, soak_client  # noqa: E402
from soak_ray_watch import Killer, Monitor, Placements, failovers, router_moves, store_failovers  # noqa: E402
from soak_sessions import SHAPES, Conv, Soak  # noqa: E402

MODEL = "tiny"  # the pool's model name at the ingress
DETAILS = ["--enable-prompt-tokens-details", "--dtype", "bfloat16"]


def ray_config(port: int, marker: str, args: argparse.Namespace) -> dict[str, Any]:
    """`kvsched ray-serve`'s YAML (as a dict): two replicas of the tiny model, each a `--blocks` pool with the FP8
    tier, the tenants' API keys and the admin key; the local store unless --no-store."""
    vllm_args = [*DETAILS, "--kvsched-fp8-tier-gb", str(args.tier_gb), "--api-key", *tenant_keys(args.tenants)]
    cfg: dict[str, Any] = {
        "http": {"host": "127.0.0.1", "port": port},
        "router": {"stats_period_s": 1, "load_factor": args.load_factor, "load_floor": args.load_floor},
        "health_check_period_s": 1, "request_retries": 3, "request_deadline_s": args.deadline_s,
        "pools": [{"name": "tiny", "model": "kvsched-tiny:test", "models": [MODEL], "served_model_name": marker,
                   "replicas": 2, "num_cpus": 0, "max_model_len": 1024, "block_size": 32, "num_blocks": args.blocks,
                   "kv_cache_gib": 1, "max_ongoing_requests": 16, "worker": "in_engine", "vllm_args": vllm_args,
                   "env": {"KVSCHED_ADMIN_KEYS": ADMIN}}]}
    if not args.no_store:
        cfg["store"] = {"url": "local", "maxmemory_mb": 64}
    return cfg


class RayServe:
    """`kvsched ray-serve CONFIG` in a process group of its own, with a Ray temp dir of its own (RAY_TMPDIR: its
    logs are this run's, whatever other clusters run here); stopped by Ctrl-C (SIGINT), then SIGKILL of what is left
    of its group and its `vllm serve` children (found by their served model name, `marker`)."""

    def __init__(self, cfg: dict[str, Any], marker: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="rsk-", dir="/tmp"))
        self.config = self.dir / "ray.yaml"
        self.config.write_text(json.dumps(cfg))  # JSON is YAML
        self.marker, self.port = marker, cfg["http"]["port"]
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def logs(self) -> Path:
        """Serve's logs of this run's cluster (Ray puts its sessions in RAY_TMPDIR/ray)."""
        return self.dir / "ray" / "ray" / "session_latest" / "logs" / "serve"

    def start(self, timeout_s: float = 900.0) -> None:
        env = {**os.environ, "RAY_TMPDIR": str(self.dir / "ray")}
        out = open(self.dir / "ray-serve.log", "wb")  # noqa: SIM115 - the process's, for its life
        self.proc = subprocess.Popen([sys.executable, "-m", "kvsched.cli", "ray-serve", str(self.config),
                                      "--num-cpus", "2"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvsched ray-serve exited {self.proc.returncode}: "
                                   f"{(self.dir / 'ray-serve.log').read_text(errors='replace')[-3000:]}")
            if b"ready on" in (self.dir / "ray-serve.log").read_bytes():
                return
            time.sleep(1.0)
        raise TimeoutError(f"kvsched ray-serve not ready after {timeout_s:g} s (log: {self.dir / 'ray-serve.log'})")

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.proc is None:
            return out
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                out["exit"] = self.proc.wait(120)
            except subprocess.TimeoutExpired:
                out["exit"] = "killed after 120 s"
        for pid in [self.proc.pid, *vllm_pids(self.marker)]:
            try:
                os.killpg(pid, signal.SIGKILL)
                out.setdefault("killed_groups", []).append(pid)
            except (ProcessLookupError, PermissionError):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        return out


def vllm_pids(marker: str) -> list[int]:
    """This run's `vllm serve` processes (their served model name is `marker`)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and " serve " in cmd:
                out.append(int(entry))
    return out


def soak_ray(ingress: Target, stock: Target, monitor: Monitor, placements: Placements, seconds: float, sessions: int,
             seed: int = 0, engine_kill_s: float | None = None, actor_kill_s: float | None = None,
             logs: Path | None = None, shapes: frozenset[str] = frozenset(SHAPES), salted: float = 0.5,
             bad: bool = True) -> dict[str, Any]:
    """The soak through `ingress` (its `observe` is `placements.observe`) against `stock` for `seconds`, the kills
    at those seconds from the start; then the end: every replica settled and probed. The report's `failures` and
    `verdict.mismatches` are empty when everything held."""
    log = Log()
    until = Until(log, seconds)
    run = Soak(ingress, stock, log, seed, shapes=shapes, salted=salted)
    killer = Killer(monitor, placements, engine_kill_s, actor_kill_s)
    threads = [threading.Thread(target=run.session, args=(i, until)) for i in range(sessions)]
    if bad:
        threads.append(threading.Thread(target=bad_requests, args=(ingress, log, until, seed * 7)))
    watchers = [threading.Thread(target=monitor.run), threading.Thread(target=killer.run)]
    started = time.monotonic()
    for t in watchers + threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    for t in watchers[1:]:  # the killer waits for its replacements (they must join), then the monitor stops
        t.join()
    monitor.stop.set()
    watchers[0].join()
    if killer.error:
        log.fail(f"the kills: {killer.error}")
    report: dict[str, Any] = {"seconds": round(wall, 1), "sessions": sessions, "seed": seed,
                              "counts": dict(sorted(log.counts.items())), "losses": placements.losses}
    report["end"] = end(ingress, stock, log, seed)
    report["verdict"] = verdict(log)
    moves = placements.moves(router_moves(logs) if logs is not None else {})
    report["router"] = {"moves": moves, "per_replica_turns": dict(placements.per_replica),
                        "sessions_seen": len(placements.turns), "load": monitor.report()}
    report["ingress"] = {"counts": dict(placements.counts), "errors": placements.errors[:50]}
    for bad_move in moves["unexplained"]:
        log.fail("a session moved between losses with no reason the router logged", **bad_move)
    for over in monitor.over_bound[:5]:
        log.fail("an engine held more requests than the router's bound", **over)
    with monitor.lock:  # (Monitor's clock is time.monotonic(), Placements' seconds from its t0)
        samples = [(t - placements.t0, rid, c) for t, rid, c in monitor.store_samples]
    report["store_failovers"] = store_failovers(placements.losses, failovers(placements), samples, placements.now())
    for row in report["store_failovers"]:
        if row["verdict"] == "miss":
            log.fail(f"sessions failed over off the {row['kind']} kill found none of their KV in the shared store",
                     **row)
    for loss in placements.losses:
        if "joined_t" not in loss:
            log.fail(f"no replacement joined after the {loss['kind']} kill", loss=loss)
        if loss.get("engine_processes_left_10s"):
            log.fail(f"the dead engine's processes outlived the {loss['kind']} kill by 10 s", loss=loss)
    report["failures"] = log.failures
    return report


def end(ingress: Target, stock: Target, log: Log, seed: int) -> dict[str, Any]:
    """Every replica's sessions ended and its pool clean (soak.settle on its engine, by its admin routes), then a
    turn through the ingress decoding as stock does, then every replica clean again."""
    out: dict[str, Any] = {}

    def engines() -> list[Target]:
        r = httpx.get(ingress.base + "/kvsched/replicas", headers=ingress.auth(admin=True), timeout=60)
        r.raise_for_status()
        return [Target(f"slot-{rep['slot']}", rep["engine_url"], MODEL, ingress.tenants[0], ADMIN)
                for rep in r.json()["replicas"]]

    for target in engines():
        out[target.name] = settle(target, log)
    with soak_client() as client:
        probe = Soak(ingress, stock, log, seed)
        hdrs = {"X-Session-Id": f"soakray{seed}-probe", "X-Session-End": "1"}
        if probe.turn(client, random.Random(seed), [{"role": "user", "content": "still there?"}], hdrs,
                      Conv(ingress.as_tenant(0), hdrs["X-Session-Id"], hdrs, None), False, 8) is None:
            log.fail("the final turn through the ingress failed")
    for target in engines():
        out[target.name]["after_probe"] = settle(target, log)
    return out


def main(argv: list[str] | None = None) -> int:
    from kvsched.bench.args import check_out_path
    from kvsched.serving import ServerSpec, VllmServer, free_port
    from kvsched.tiny_model import ensure_tiny_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--sessions", type=int, default=6, help="concurrent sessions through the ingress (each compared)")
    p.add_argument("--blocks", type=int, default=40, help="each replica's KV pool (--num-gpu-blocks-override)")
    p.add_argument("--tier-gb", type=float, default=0.003, help="each replica's FP8 tier (--kvsched-fp8-tier-gb)")
    p.add_argument("--tenants", type=int, default=2, help="API keys, each a tenant")
    p.add_argument("--load-factor", type=float, default=1.25)
    p.add_argument("--load-floor", type=int, default=6)
    p.add_argument("--deadline-s", type=float, default=90.0, help="the ingress's request_deadline_s")
    p.add_argument("--engine-kill", type=float, default=0.3, help="when slot 0's engine is killed (share of the run)")
    p.add_argument("--actor-kill", type=float, default=0.6, help="when slot 1's replica actor is (share; after the "
                   "first replacement joined)")
    p.add_argument("--no-kill", action="store_true")
    p.add_argument("--no-store", action="store_true", help="no shared store (the replicas' KV their own)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="turn shapes besides plain ones ('' for none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:  # before anything starts: a bad path found once the run was over loses its report
        check_out_path("--out", args.out)
    except ValueError as exc:
        p.error(str(exc))
    seconds = args.minutes * 60
    model = ensure_tiny_model("test")
    marker = f"tiny-soakray-{uuid.uuid4().hex[:8]}"
    stock_server = VllmServer(ServerSpec(model=model, scheduler=None, worker="in_engine", max_model_len=1024,
                                         extra_args=DETAILS))
    ray = RayServe(ray_config(free_port(), marker, args), marker)
    report: dict[str, Any] = {"cpu": cpu(), "args": {k: str(v) for k, v in vars(args).items()},
                              "logs": str(ray.dir)}  # ray-serve's output and Ray's logs, left for a look
    try:
        stock_server.start()
        ray.start()
        stock = Target("stock", stock_server.base, "tiny")
        placements = Placements()
        keys = tenant_keys(args.tenants)  # (`key`: the bad requests', which are refused 401 without one)
        ingress = Target("ray", ray.base, MODEL, keys[0], ADMIN, tenants=keys, observe=placements.observe)
        monitor = Monitor(ray.base, ADMIN, args.load_factor, args.load_floor)
        kills = (None, None) if args.no_kill else (args.engine_kill * seconds, args.actor_kill * seconds)
        report |= soak_ray(ingress, stock, monitor, placements, seconds, args.sessions, args.seed, *kills,
                           logs=ray.logs, shapes=frozenset(s for s in args.shapes.split(",") if s))
    finally:
        report["stopped"] = ray.stop()
        stock_server.stop()
        args.out.write_text(json.dumps(report, indent=1, default=str))
    v = report.get("verdict", {})
    print(json.dumps({k: report.get(k) for k in ("seconds", "losses", "counts")}, default=str)[:3000])
    print(f"compared {v.get('compared')} (exact {v.get('exact')}, flips {v.get('flips')}), "
          f"mismatches {v.get('mismatch_count')}, failures {len(report.get('failures', []))}; wrote {args.out}")
    return 0 if not report.get("failures") and not v.get("mismatch_count") else 1


if __name__ == "__main__":
    sys.exit(main())
