"""A real engine whose `/metrics` hangs, on a real Ray Serve cluster on loopback: kvsched's ingress, one engine
replica (`stalling_engine.ProxiedEngineReplica`: kvsched's `EngineReplica` with its real `vllm serve --scheduler
kvsched` on the tiny model, behind a proxy that stalls `GET /metrics` while a file exists: the connection accepted,
never answered) and the pool's policy recording each decision (`standin_ttft.RecordingPolicy`; min 0 replicas, Ray's
downscale delay 600 s, so what is checked is the decisions). Idle and read, the policy asks to scale the pool to 0.
Blocked: Ray's own calls of the replica's `record_autoscaling_stats` and `record_routing_stats` meet the hanging scrape
(each poll gives up at its deadline: the router's `poll_deadline_s`, 2 s here, as `build_app` passes it),
`GET /kvsched/replicas` says "failing", the policy holds the pool ("no scale-down while replica(s) ... cannot be
read") and completions through the ingress are answered meanwhile (the proxy saw their bytes pass while a scrape hung).
Unblocked: "ok", and the idle pool may go again."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvsched.commands.ray_serve_stop import groups_of, kill_groups, merge
from tests.ray.shared_cluster import Early
from tests.ray.test_serve_unscraped import decisions, replicas, wait_for

pytestmark = pytest.mark.integration
POLL_DEADLINE_S = 2.0  # the router's poll_deadline_s (default 5 s): each wait for a hanging poll to give up is shorter
MARK = f"tiny-blocked-{uuid.uuid4().hex[:8]}"  # served-model-name of this run's vLLM: finds it in /proc


def vllm_groups() -> set[int]:
    """This run's `vllm serve` API servers (each leads its own process group)."""
    out = set()
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.isdigit() and MARK in cmd and " serve " in cmd:
            out.add(int(entry))
    return out


APP = "blocked"  # its Serve app and route prefix: deployed early (`EARLY`) beside the other modules' apps at "/"


def deploy_blocked() -> dict[str, Any]:
    """The app (deployed, not waited for), its files and URL: the module's fixture takes it (`EARLY`)."""
    import tempfile

    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    from kvsched.adapters.ray.app import engine_args, engine_kwargs, engine_options
    from kvsched.adapters.ray.config import parse_config
    from kvsched.adapters.ray.ingress import OpenAIIngress
    from kvsched.tiny_model import ensure_tiny_model
    from tests.ray.shared_cluster import QUICK_DRAIN, start_app, start_cluster
    from tests.ray.stalling_engine import ProxiedEngineReplica
    from tests.vllm_layout import worker

    cluster = start_cluster()
    tmp = Path(tempfile.mkdtemp(prefix="blocked-"))
    cfg = parse_config({"http": {"host": "127.0.0.1", "port": cluster["port"]}, "route_prefix": f"/{APP}",
                        "router": {"stats_period_s": 1, "poll_deadline_s": POLL_DEADLINE_S},
                        "pools": [{"name": "w", "model": str(ensure_tiny_model("test")), "models": ["tiny"],
                                   "served_model_name": MARK, "replicas": 1, "num_cpus": 0, "max_model_len": 1024,
                                   "block_size": 32, "kv_cache_gib": 1, "worker": worker(),
                                   "autoscaling": {"min_replicas": 0, "max_replicas": 2, "ttft_p95_s": 4.0}}]})
    w = cfg.pools[0]
    opts = engine_options(w, cfg)
    auto = opts["autoscaling_config"]
    opts["autoscaling_config"] = AutoscalingConfig(  # Ray's windows made short, the policy recording its decisions
        min_replicas=0, max_replicas=2, initial_replicas=1, upscale_delay_s=0, downscale_delay_s=600,
        look_back_period_s=5, metrics_interval_s=1,
        policy=AutoscalingPolicy(policy_function="tests.ray.standin_ttft:RecordingPolicy",
                                 policy_kwargs={**auto.policy.policy_kwargs, "report_path": str(tmp / "decisions")}))
    engine = serve.deployment(ProxiedEngineReplica).options(**{**opts, **QUICK_DRAIN}).bind(
        *engine_args(w), str(tmp / "block"), str(tmp / "proxy.json"), **engine_kwargs(cfg))
    ingress = serve.deployment(OpenAIIngress).options(name="ingress", num_replicas=1,
                                                      ray_actor_options={"num_cpus": 0}, **QUICK_DRAIN)
    start_app(ingress.bind(cfg.to_dict(), {"w": engine}), APP, route_prefix=f"/{APP}")
    return {"base": f"{cluster['base']}/{APP}", "block": tmp / "block", "proxy": tmp / "proxy.json",
            "report": tmp / "decisions"}


def delete_blocked(pool: dict[str, Any] | None = None) -> None:
    """The app deleted, this run's `vllm serve` groups killed should its deletion have left any (not into the rest of
    the session), its files removed."""
    import shutil

    from tests.ray.shared_cluster import delete_app

    groups = groups_of(vllm_groups())
    try:
        delete_app(APP)
    finally:  # each group only while it holds a member recorded with it (review71: its number may name another's)
        kill_groups(merge(groups, groups_of(vllm_groups())), wait_s=1.0)
        if pool is not None:
            shutil.rmtree(pool["block"].parent, ignore_errors=True)


# deployed at the first test after test_serve_integration's (its app's engines down), its engine's start-up beside the
# light modules between, which leave a core idle (where this module's set-up waited ~26 s for it)
EARLY = {"app": Early(deploy_blocked, delete_blocked, main_thread=True, once_over="tests.ray.test_serve_integration")}


@pytest.fixture(scope="module")
def blocked_pool(serve_cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    from tests.ray.shared_cluster import early, wait_running

    pool = None
    try:
        pool = early(sys.modules[__name__], "app")
        wait_running(APP)
        yield pool
    finally:
        delete_blocked(pool)


def chat(base: str) -> int:
    body = json.dumps({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "tool result"}]})
    req = urllib.request.Request(base + "/v1/chat/completions", data=body.encode(),
                                 headers={"Content-Type": "application/json", "X-Session-Id": "blocked/worker"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert json.loads(r.read())["choices"]
        return int(r.status)


def stalled(path: Path) -> dict[str, int]:
    """The proxy's counts (`StallingProxy._report`; none before its first stall)."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return {"stalls": 0, "stalled_now": 0, "sent_while_stalled": 0}


def rows_since(report: Path, start: int, prefix: str) -> list[dict[str, Any]]:
    """Decisions after the first `start`, the pool's one replica running, whose reason starts with `prefix`."""
    return [r for r in decisions(report)[start:] if r["running"] == 1 and (r["reason"] or "").startswith(prefix)]


def test_a_hanging_scrape_holds_the_pool_and_the_engine_serves_meanwhile(blocked_pool: dict[str, Any]) -> None:
    base, report = blocked_pool["base"], blocked_pool["report"]
    wait_for("the replica's engine metrics read", lambda: replicas(base).get(0, {}).get("engine_metrics") == "ok",
             timeout_s=300)
    assert chat(base) == 200
    start = len(decisions(report))
    idle = wait_for("the idle pool, read, asked to go to 0", lambda: rows_since(report, start, "down:"))
    assert idle[0]["replicas"] == 0, idle

    blocked_pool["block"].touch()
    start = len(decisions(report))
    seen = wait_for("the replica's engine metrics failing", lambda: (lambda r: r if r.get("engine_metrics") ==
                                                                     "failing" else None)(replicas(base).get(0, {})))
    assert seen["engine_metrics_unread_s"] > 0, seen
    answered = []
    for _ in range(3):  # through the ingress, Ray's router and the replica, to the engine, while a scrape hangs
        wait_for("a scrape hanging at the proxy", lambda: stalled(blocked_pool["proxy"])["stalled_now"] >= 1)
        answered.append(chat(base))
    proxy = stalled(blocked_pool["proxy"])
    assert answered == [200, 200, 200] and proxy["stalls"] >= 1 and proxy["sent_while_stalled"] > 0, proxy
    held = wait_for("three decisions holding the pool for the replica that cannot be read", lambda: (
        lambda rs: rs if len(rs) >= 3 else None)(rows_since(report, start, "steady: no scale-down while replica(s)")))
    first = decisions(report).index(held[0], start)
    after = [r for r in decisions(report)[first:] if r["running"] == 1]
    assert all(r["replicas"] == 1 and "cannot be read" in r["reason"] for r in after), after  # none went down
    assert replicas(base)[0]["engine_metrics"] == "failing"  # (still blocked: the default grace is 60 s)

    blocked_pool["block"].unlink()
    wait_for("the replica read again", lambda: replicas(base).get(0, {}).get("engine_metrics") == "ok")
    start = len(decisions(report))
    again = wait_for("the idle pool asked to go to 0 again", lambda: rows_since(report, start, "down:"))
    assert again[0]["replicas"] == 0, again
