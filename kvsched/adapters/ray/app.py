"""The Ray Serve application: one engine deployment per pool (kvsched's router, its autoscaling policy) behind the
OpenAI ingress. `build_app(config)` for Python, `app_builder` for Ray's own CLI:

    serve run kvsched.adapters.ray.app:app_builder config=examples/ray/tiny-cpu.yaml
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

from kvsched.adapters.ray.autoscaling import POLICY_PATH
from kvsched.adapters.ray.config import PoolConfig, RayServeConfig, load_config
from kvsched.adapters.ray.engine import EngineReplica
from kvsched.adapters.ray.ingress import OpenAIIngress
from kvsched.adapters.ray.poll_settings import routing_stats_timeout_s
from kvsched.core.ttft_histogram import TTFT_HOLD_S, UNSCRAPED_GRACE_S

ROUTER_PATH = "kvsched.adapters.ray.router:KVSchedRequestRouter"
# How often a stopping replica counts the requests it still holds (Ray's graceful_shutdown_wait_loop_s, 2 s by
# default, slept once before the first count even when none is in flight: 2 s per deployment tier at every stop).
DRAIN_POLL_S = 0.2
# Ray's own routers, for comparisons in the same cluster (`kvsched bench router --real`).
BASELINE_ROUTERS = {
    "consistent_hash": "ray.serve.experimental.consistent_hash_router:ConsistentHashRouter",
    "pow2": "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter",
}


def engine_options(pool: PoolConfig, cfg: RayServeConfig, router_path: str = ROUTER_PATH) -> dict[str, Any]:
    """Ray Serve deployment options of one pool's engine replicas (`router_path`: another RequestRouter, for
    baselines; kvsched's router settings apply to kvsched's router only)."""
    kwargs = dataclasses.asdict(cfg.router.core(pool.max_ongoing_requests)) if router_path == ROUTER_PATH else {}
    opts: dict[str, Any] = {
        "name": f"engine-{pool.name}",
        "max_ongoing_requests": pool.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
        "request_router_config": RequestRouterConfig(
            request_router_class=router_path,
            request_router_kwargs=kwargs,
            request_routing_stats_period_s=cfg.stats_period_s,
            request_routing_stats_timeout_s=routing_stats_timeout_s(cfg.stats_period_s)),
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": 30.0,  # a replica taken out by a scale-down: its requests finish within it
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
    }
    t = pool.autoscaling
    if t is None:
        opts["num_replicas"] = pool.replicas
    else:
        opts["autoscaling_config"] = AutoscalingConfig(
            min_replicas=t.min_replicas, max_replicas=t.max_replicas,
            initial_replicas=min(max(pool.replicas, t.min_replicas), t.max_replicas),
            upscale_delay_s=t.upscale_delay_s, downscale_delay_s=t.downscale_delay_s,
            look_back_period_s=t.look_back_period_s,
            policy=AutoscalingPolicy(policy_function=POLICY_PATH, policy_kwargs=dataclasses.asdict(t)))
    return opts


def engine_args(pool: PoolConfig) -> tuple[str, dict[str, Any], float, float]:
    """`EngineReplica`'s arguments for one pool: its name, its engine, the grace its engine's metrics may go unread
    before the replica calls them stale, and how long it holds its own P95 TTFT (its autoscaling's, else the policy's
    defaults: there is no policy)."""
    t = pool.autoscaling
    if t is None:
        return pool.name, pool.engine.model_dump(), UNSCRAPED_GRACE_S, TTFT_HOLD_S
    return pool.name, pool.engine.model_dump(), t.unscraped_grace_s, t.ttft_hold_s


def engine_kwargs(cfg: RayServeConfig) -> dict[str, float]:
    """`EngineReplica`'s keyword arguments, the same for every pool: the router's settings of a replica's stats poll
    (poll_settings.py)."""
    return {"poll_deadline_s": cfg.router.poll_deadline_s, "routing_wait_s": cfg.router.routing_wait_s}


def ingress_max_ongoing(cfg: RayServeConfig) -> int:
    """Requests the ingress replica takes at once: every engine replica's share at its largest. The ingress only
    relays; left at Ray's default (5) it queued requests at the HTTP proxy, and the engines' router saw at most 5 in
    flight, where the load bound is tightest."""
    return max(100, sum(p.max_ongoing_requests * (p.autoscaling.max_replicas if p.autoscaling else p.replicas)
                        for p in cfg.pools))


def build_app(cfg: RayServeConfig, router_path: str = ROUTER_PATH, version: str | None = None) -> Application:
    """`version`: a fixed version of the engine deployments, so that redeploying with only `replicas` changed scales
    the pools in place instead of replacing every replica (serve.run gives a deployment without one a random version,
    i.e. new code). Ray 2.60 took `version` out of the public `Deployment.options()` ("Serve manages deployment
    versions internally") but still honours it on its internal path, which this uses; the stateless ingress is
    replaced as usual."""
    extra: dict[str, Any] = {"version": version, "_internal": True} if version is not None else {}
    engines = {p.name: serve.deployment(EngineReplica).options(**engine_options(p, cfg, router_path), **extra).bind(
        *engine_args(p), **engine_kwargs(cfg)) for p in cfg.pools}
    ingress = serve.deployment(OpenAIIngress).options(name="ingress", num_replicas=1,
                                                      max_ongoing_requests=ingress_max_ongoing(cfg),
                                                      graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
                                                      ray_actor_options={"num_cpus": 0})
    return ingress.bind(cfg.to_dict(), engines)


def app_builder(args: dict[str, str]) -> Application:
    """For `serve run kvsched.adapters.ray.app:app_builder config=PATH.yaml`."""
    if "config" not in args:
        raise ValueError("pass config=PATH.yaml")
    from kvsched.adapters.ray.store import read_store_section, with_store

    cfg = load_config(Path(args["config"]))
    store = read_store_section(args["config"])
    if store is not None and store.local:
        raise ValueError("store.url local needs `kvsched ray-serve` (it starts the redis-server); give a redis:// URL")
    return build_app(with_store(cfg, store.url, store) if store is not None else cfg)
