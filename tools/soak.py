"""A mixed soak of a real `vllm serve --scheduler kvsched` (FP8 tier on, a small KV pool) against stock vLLM serving
the same tiny model: concurrent agent sessions (an orchestrator and workers per workflow, tool results appended turn
after turn, greedy decoding) with churn (clients leaving mid-stream, aborted requests, admin DELETEs while a turn
runs, X-Session-End, sessions idle past a 1 s TTL), bad requests and /metrics scrapes interleaved. Checked: every
turn kvsched completes decodes the tokens stock decodes for the same prompt (a divergence only where stock itself sees
a near tie: within twice the logprob noise measured stock against stock in the same run), no 5xx anywhere, and, once
every session is ended, no pin, every block free and the tier empty (its disk level too), the engine still serving. A
third server runs kvsched's compaction (summarize: prompts rewritten by design), checked for the invariants only.
The sessions (tools/soak_sessions.py) call as several tenants (API keys), half of them under a cache_salt of their own
(the first request under a salt may get no cached token: `usage.prompt_tokens_details`), and take turn shapes besides
plain turns: two turns of one session at once, an edited history, prompts near and past the context limit.

    flock /tmp/kv/heavy.lock .venv/bin/python tools/soak.py --minutes 10 --sessions 8 --out /tmp/soak.json

tests/integration/test_soak.py runs `soak` for a few seconds against the suite's shared servers.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its clients, tools/soak_clients.py (a script's sibling)
from soak_clients import Log, Reply, Target, Until, bad_requests, scrape, soak_client  # noqa: E402
from soak_sessions import SHAPES, Conv, Soak  # noqa: E402


def settle(target: Target, log: Log, timeout_s: float = 30.0) -> dict[str, Any]:
    """End every session (admin), then wait for pins 0, every block free and the tier empty (its disk level too: an
    ended session's blocks leave it); a failure if not, or if the sessions' listing cannot be read (an error status,
    a body without its stats, the server gone: retried until `timeout_s`, then reported with what it answered, found
    by review: it raised KeyError and the run's report was lost)."""
    if not target.kvsched:
        return {}
    ended = 0
    try:
        r = httpx.delete(target.base + "/kvsched/sessions", headers=target.auth(admin=True), timeout=60)
        if r.status_code != 200:
            log.fail(f"{target.name}: DELETE of every session answered {r.status_code}", body=r.text[:300])
        else:
            ended = r.json().get("ended", 0)
    except (httpx.HTTPError, ValueError) as exc:
        log.fail(f"{target.name}: DELETE of every session failed ({type(exc).__name__}: {exc})")
    deadline = time.monotonic() + timeout_s
    st: dict[str, Any] | None = None
    error = ""
    while True:
        st, error = _stats(target)
        clean = st is not None and st["pinned_blocks"] == 0 and st["free_blocks"] == st["total_blocks"] \
            and st.get("tier_blocks", 0) == 0 and st.get("disk_tier_blocks", 0) == 0
        if clean or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if st is None:
        log.fail(f"{target.name}: the sessions' stats could not be read after every session ended", error=error)
        return {"ended": ended, "error": error}
    keys = ("pinned_blocks", "free_blocks", "total_blocks", "tier_blocks", "tier_bytes", "disk_tier_blocks",
            "active_sessions")
    out = {"ended": ended, **{k: st.get(k) for k in keys}}
    if not clean:
        log.fail(f"{target.name}: not clean after every session ended", stats=out)
    return out


def _stats(target: Target) -> tuple[dict[str, Any] | None, str]:
    """GET /kvsched/sessions' stats, or (None, what went wrong)."""
    try:
        r = httpx.get(target.base + "/kvsched/sessions?limit=1", headers=target.auth(admin=True), timeout=60)
        if r.status_code != 200:
            return None, f"status {r.status_code}: {r.text[:300]}"
        st = r.json().get("stats")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(st, dict) or not all(k in st for k in ("pinned_blocks", "free_blocks", "total_blocks")):
        return None, f"no stats in the answer: {r.text[:300]}"
    return st, ""


def judge(a: Reply, b: Reply, tol: float) -> tuple[str, float, float]:
    """('exact' | 'flip' | 'mismatch', the largest logprob difference over the tokens both decoded alike, the gap).
    At the first token that differs, the gap is how far below its own choice stock (`b`) ranks `a`'s token (inf when
    not in its top TOP). A flip: a gap within `2 * tol`, a near tie the servers' batched numerics may break either way;
    anything else is a mismatch (wrong KV served would be one)."""
    n = 0
    while n < min(len(a.tokens), len(b.tokens)) and a.tokens[n] == b.tokens[n]:
        n += 1
    drift = max((abs(x - y) for x, y in zip(a.logprobs[:n], b.logprobs[:n], strict=True)), default=0.0)
    if a.tokens == b.tokens:
        return "exact", drift, 0.0
    if n == min(len(a.tokens), len(b.tokens)):  # one side stopped (its end-of-sequence token) where the other went on
        return "mismatch", drift, float("inf")
    gap = b.logprobs[n] - b.tops[n].get(a.tokens[n], float("-inf"))
    return ("flip" if gap <= 2 * tol else "mismatch"), drift, gap


def verdict(log: Log, tol: float | None = None) -> dict[str, Any]:
    """Every subject's turn against stock's. `tol`: stock's own logprob noise, from an A/A run (`--aa`: stock against
    stock under the same soak); by default the largest difference between stock's two answers to the same prompt
    (a share of the turns is sent to stock twice: `Soak.stock_twice`)."""
    stock = [judge(a, b, 0.0) for kind, a, b, _ in log.pairs if kind == "stock"]
    measured = max((max(d, g) for _, d, g in stock), default=0.0)
    tol = measured if tol is None else tol
    out: dict[str, Any] = {"stock_pairs": len(stock), "stock_exact": sum(k == "exact" for k, _, _ in stock),
                           "stock_max_drift": measured, "tol": tol, "mismatches": []}
    kinds: Counter[str] = Counter()
    drifts, gaps = [], []
    for kind, a, b, request in log.pairs:
        if kind != "subject":
            continue
        verdict_, drift, gap = judge(a, b, tol)
        kinds[verdict_] += 1
        drifts.append(drift)
        if verdict_ != "exact":
            gaps.append(round(gap, 5))
        if verdict_ == "mismatch":
            out["mismatches"].append({"request": request, "subject": a.tokens, "stock": b.tokens,
                                      "subject_text": a.text, "stock_text": b.text, "drift": drift, "gap": gap})
    # the check's power on this model: each turn against stock's answer to another turn's prompt (wrong KV's kind)
    subject = [(a, b) for kind, a, b, _ in log.pairs if kind == "subject"]
    control = [judge(a, subject[i - 1][1], tol)[0] for i, (a, _) in enumerate(subject) if len(subject) > 1]
    out.update(control_pairs=len(control), control_caught=sum(k == "mismatch" for k in control))
    drifts.sort()
    out.update(compared=sum(kinds.values()), exact=kinds["exact"], flips=kinds["flip"],
               mismatch_count=kinds["mismatch"], divergence_gaps=sorted(gaps), drift_max=drifts[-1] if drifts else 0.0,
               drift_p50=drifts[len(drifts) // 2] if drifts else 0.0,
               drift_over_tol=sum(d > tol for d in drifts), drift_over_2tol=sum(d > 2 * tol for d in drifts))
    return out


def soak(kvsched: Target, stock: Target | None, seconds: float, sessions: int, seed: int = 0,
         extra: list[tuple[Target, int]] | None = None, tol: float | None = None, min_compared: int = 0,
         cap_s: float | None = None, shapes: frozenset[str] = frozenset(SHAPES), salted: float = 0.5) -> dict[str, Any]:
    """Run the soak for `seconds` and judge it: `sessions` sessions on `kvsched` compared with `stock`, plus for each
    (target, n) of `extra` n sessions on that target checked for invariants only. The report's `failures` and
    `verdict.mismatches` are empty when everything held. With `min_compared`, it runs on past `seconds` until that
    many turns were compared, up to `cap_s` (`soak_clients.Until`). `shapes`: which of soak_sessions.SHAPES the
    sessions' turns take besides plain ones; `salted`: the share of conversations with a cache_salt of their own."""
    log = Log()
    until = Until(log, seconds, min_compared, cap_s)
    runs = [(Soak(kvsched, stock, log, seed, shapes=shapes, salted=salted), sessions)] + [
        (Soak(t, None, log, seed + 1 + i, shapes=shapes, salted=salted), n) for i, (t, n) in enumerate(extra or [])]
    threads = [threading.Thread(target=run.session, args=(i, until)) for run, n in runs for i in range(n)]
    for i, (run, _) in enumerate(runs):
        threads += [threading.Thread(target=bad_requests, args=(run.kvsched, log, until, seed * 7 + i)),
                    threading.Thread(target=scrape, args=(run.kvsched, log, until))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    report: dict[str, Any] = {"seconds": round(wall, 1), "sessions": sessions, "seed": seed,
                              "counts": dict(sorted(log.counts.items())), "end": {}}
    for run, _ in runs:
        report["end"][run.kvsched.name] = settle(run.kvsched, log)
        with soak_client() as client:  # the engine still serves, and decodes as stock does
            probe = Soak(run.kvsched, run.stock, log, seed)
            hdrs = {"X-Session-Id": f"soak{seed}-probe", "X-Session-End": "1"}
            if probe.turn(client, random.Random(seed), [{"role": "user", "content": "still there?"}], hdrs,
                          Conv(run.kvsched.as_tenant(0), hdrs["X-Session-Id"], hdrs, None), False, 8) is None:
                log.fail(f"{run.kvsched.name}: the final turn failed")
        report["end"][run.kvsched.name]["after_probe"] = settle(run.kvsched, log)
    report["verdict"] = verdict(log, tol)
    report["failures"] = log.failures
    return report


def servers(args: argparse.Namespace) -> dict[str, Any]:
    """The soak's `vllm serve` processes (not started), each reporting its prefix-cache hits per request
    (--enable-prompt-tokens-details): stock, kvsched (FP8 tier on, `--blocks` blocks of KV, the tier's disk level
    unless --disk-gb 0, `--tenants` API keys) and, unless --no-compaction, kvsched with compaction (summarize; as
    tests/integration/servers.py's)."""
    import tempfile

    from kvsched.serving import ServerSpec, VllmServer
    from kvsched.tiny_model import ensure_tiny_model

    model = ensure_tiny_model("test")
    common: dict[str, Any] = {"model": model, "max_model_len": 1024, "dtype": "bfloat16"}
    details = ["--enable-prompt-tokens-details"]
    admin = {"KVSCHED_ADMIN_KEYS": ADMIN}
    keys = ["--api-key", *tenant_keys(args.tenants)]
    args.disk_dir = tempfile.mkdtemp(prefix="soak-disk-") if args.disk_gb and not args.aa else None
    disk = ["--kvsched-disk-tier-dir", args.disk_dir, "--kvsched-disk-tier-gb", str(args.disk_gb)] \
        if args.disk_dir else []
    subject = ServerSpec(scheduler=None, num_blocks=args.blocks, extra_args=keys + details, **common) if args.aa \
        else ServerSpec(scheduler="kvsched", num_blocks=args.blocks, env=admin,
                        extra_args=["--kvsched-fp8-tier-gb", str(args.tier_gb), *disk, *keys, *details], **common)
    out = {"stock": VllmServer(ServerSpec(scheduler=None, worker="in_engine", extra_args=details, **common)),
           "kvsched": VllmServer(subject)}
    if not args.no_compaction and not args.aa:
        env = {**admin, "KVSCHED_COMPACTION": "summarize", "KVSCHED_COMPACTION_TRIGGER_TOKENS": "300",
               "KVSCHED_COMPACTION_KEEP_RECENT_MESSAGES": "2", "KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS": "48",
               "KVSCHED_COMPACTION_WAIT_FOR_SUMMARY": "1", "KVSCHED_COMPACTION_RETRY_AFTER_S": "5"}
        out["compaction"] = VllmServer(ServerSpec(scheduler="kvsched", num_blocks=args.blocks * 2, env=env,
                                                  worker="in_engine", extra_args=details, **common))
    return out


ADMIN = "soak-admin"


def tenant_keys(n: int) -> tuple[str, ...]:
    return tuple(f"soak-key-{i}" for i in range(max(1, n)))


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = {k.strip(): v for k, v in (line.split(":", 1) for line in info.splitlines() if ":" in line)}
    return " ".join(fields.get(k, "?").strip() for k in ("model name", "cpu family", "model"))


def main(argv: list[str] | None = None) -> int:
    from kvsched.bench.args import check_out_path
    from kvsched.serving import start_all

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions on kvsched (each compared)")
    p.add_argument("--compaction-sessions", type=int, default=3)
    p.add_argument("--blocks", type=int, default=40, help="kvsched's KV pool (--num-gpu-blocks-override)")
    p.add_argument("--tier-gb", type=float, default=0.003, help="kvsched's FP8 tier (--kvsched-fp8-tier-gb)")
    p.add_argument("--disk-gb", type=float, default=0.01, help="the tier's disk level (a temporary directory; 0: off)")
    p.add_argument("--tenants", type=int, default=2, help="kvsched's API keys, each a tenant")
    p.add_argument("--salted", type=float, default=0.5, help="the share of conversations with a cache_salt")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"turn shapes besides plain ones, of {','.join(SHAPES)}"
                   " (race: next turn before the answer; fanout: two tasks, one id; edit: history rewritten; long: "
                   "near the context limit); '' for none")
    p.add_argument("--no-compaction", action="store_true")
    p.add_argument("--aa", action="store_true", help="A/A: a second stock server (its --blocks pool) as the subject")
    p.add_argument("--tol", type=float, help="stock's logprob noise, from an --aa run (default: measured in the run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    try:  # before the servers and the run: a bad path was found only once the run was over, its report lost
        check_out_path("--out", args.out)
    except ValueError as exc:
        p.error(str(exc))
    shapes = frozenset(s for s in args.shapes.split(",") if s)
    if shapes - set(SHAPES):
        p.error(f"--shapes: unknown {sorted(shapes - set(SHAPES))}; known: {', '.join(SHAPES)}")
    if not 0.0 <= args.salted <= 1.0:  # a share: outside it every conversation salted or none, silently
        p.error(f"--salted: a share of conversations between 0 and 1, not {args.salted}")
    named: dict[str, Any] = {}
    args.disk_dir = None
    try:  # servers() makes the disk level's directory first: removed below even if a server cannot be built
        named = servers(args)
        start_all(list(named.values()))
        stock = Target("stock", named["stock"].base, "tiny")
        keys = tenant_keys(args.tenants)
        kv = Target("stock-aa" if args.aa else "kvsched", named["kvsched"].base, "tiny", keys[0], ADMIN, not args.aa,
                    keys)
        extra = [] if args.no_compaction or args.aa else [
            (Target("compaction", named["compaction"].base, "tiny", None, ADMIN), args.compaction_sessions)]
        report = soak(kv, stock, args.minutes * 60, args.sessions, args.seed, extra, args.tol, shapes=shapes,
                      salted=args.salted)
        report["metrics"] = {name: {k: v for k, v in s.metrics().items() if k.startswith("kvsched_") and "{" not in k}
                             for name, s in named.items() if name != "stock"}
    finally:
        for server in named.values():
            server.stop()
        if args.disk_dir:
            shutil.rmtree(args.disk_dir, ignore_errors=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report.update(commit=commit, cpu=cpu(), argv=sys.argv[1:], logs={n: str(s.log_path) for n, s in named.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)  # as the bench commands' --out (check_out_path allowed it)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    v = report["verdict"]
    print(json.dumps({"counts": report["counts"], "end": report["end"], "failures": len(report["failures"]),
                      **{k: v[k] for k in v if k != "mismatches"}}, indent=1))
    return 1 if report["failures"] or v["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
