"""`kvsched ray-serve CONFIG.yaml`: serve pools of `vllm serve --scheduler kvsched` engines on Ray Serve behind one
OpenAI-compatible endpoint, with session-affine, load-bounded, KV-aware routing (see kvsched/adapters/ray)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from kvsched.bench.args import check_args, number, refuse


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "ray-serve", help="serve kvsched engine pools on Ray Serve (one OpenAI endpoint)", description=__doc__)
    p.add_argument("config", type=Path, help="YAML config (see examples/ray/)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs for a local Ray cluster")
    p.add_argument("--dry-run", action="store_true", help="check the config and print the deployments; start nothing")
    p.set_defaults(func=run)


def describe(cfg: Any) -> str:
    from kvsched.adapters.ray import poll_settings as ps

    ray_timeout, margin = ps.autoscaling_stats_timeout_s(), ps.RAY_CALL_MARGIN_S
    routing_timeout = ps.routing_stats_timeout_s(cfg.stats_period_s)
    lines = [f"app {cfg.app_name!r} on http://{cfg.host}:{cfg.port}{cfg.route_prefix} "
             f"(router c={cfg.router.load_factor}, load floor {cfg.router.load_floor}, {cfg.router.virtual_nodes} virtual nodes, "
             f"stats every {cfg.stats_period_s}s; poll_deadline_s {cfg.router.poll_deadline_s:g}s: each replica reads "
             f"its engine's /metrics and session list within it (at most Ray's record_autoscaling_stats timeout, "
             f"{'unreadable' if ray_timeout is None else f'{ray_timeout:g}s'} here, less {margin:g}s); routing_wait_s "
             f"{cfg.router.routing_wait_s:g}s: Ray's routing-stats call waits that long for a poll in flight (at most "
             f"its timeout, {routing_timeout:g}s, less {margin:g}s))"]
    for p in cfg.pools:
        scale = (f"autoscaling {p.autoscaling.min_replicas}-{p.autoscaling.max_replicas} on queue depth "
                 f"{p.autoscaling.queue_per_replica}/replica and p95 TTFT {p.autoscaling.ttft_p95_s}s over "
                 f"{p.autoscaling.look_back_period_s:g}s (ttft_hold_s {p.autoscaling.ttft_hold_s:g}s: the last P95 "
                 f"keeps the pool from scaling down that long; unscraped_grace_s {p.autoscaling.unscraped_grace_s:g}s: "
                 f"a replica's engine metrics unread longer are left out)"
                 if p.autoscaling else f"{p.replicas} replica(s)")
        lines.append(f"  pool {p.name}: models {', '.join(p.models)}; roles {', '.join(p.roles) or '-'}; "
                     f"{'long-context; ' if p.long_context else ''}{p.device}; {scale}; engine {p.engine.model} "
                     f"--max-model-len {p.engine.max_model_len} --scheduler {p.engine.scheduler}")
    if cfg.long_context_tokens:
        lines.append(f"  sessions past {cfg.long_context_tokens} tokens go to the long-context pool")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from kvsched.adapters.ray.config import ConfigError, load_config

    try:
        check_cpus(args)
    except ValueError as exc:
        return refuse("kvsched ray-serve", exc)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"kvsched ray-serve: {exc}", file=sys.stderr)
        return 2
    try:
        check_pool_cpus(cfg, args.num_cpus)
    except ValueError as exc:
        return refuse("kvsched ray-serve", exc)
    from kvsched.adapters.ray.store import read_store_section

    try:
        store = read_store_section(args.config)
    except ConfigError as exc:
        print(f"kvsched ray-serve: {exc}", file=sys.stderr)
        return 2
    print(describe(cfg))
    if store is not None:
        from kvsched.adapters.store.redis_store import redacted

        # found by review: the URL's password (user part, ?password=, ?ssl_password=) was printed as given
        print(f"  shared store: {'a local redis-server (started here)' if store.local else redacted(store.url)} "
              f"(KV blocks, session metadata, compaction summaries)")
    if args.dry_run:
        return 0
    local = None
    if store is not None:
        from kvsched.adapters.ray.store import with_store

        if store.local:
            from kvsched.adapters.store.local_redis import LocalRedis, RedisUnavailable

            try:
                local = LocalRedis(maxmemory_mb=store.maxmemory_mb).start()
            except RedisUnavailable as exc:
                print(f"kvsched ray-serve: store.url local: {exc}", file=sys.stderr)
                return 2
            print(f"kvsched ray-serve: shared store {local.url}")
        cfg = with_store(cfg, local.url if local is not None else store.url, store)

    try:
        return _serve(args, cfg)
    finally:  # the local store goes with this command, however it ends (found by review: an error or Ctrl-C while
        if local is not None:  # Ray started left its redis-server running)
            local.stop()


def check_cpus(args: argparse.Namespace) -> None:
    """--num-cpus sizes the local cluster this command starts (found by review: with --address, Ray's ValueError was
    a traceback once the config was read; a negative or NaN count was taken with --dry-run)."""
    check_args(args, num_cpus=number(0.0, 1e6))
    # found by review: a fraction, and --num-cpus with RAY_ADDRESS set (ray.init joins that cluster, as --address),
    # passed --dry-run, then were Ray's ValueError once the config was read and a local store started
    if args.num_cpus is not None and not float(args.num_cpus).is_integer():
        raise ValueError(f"--num-cpus must be a whole number (Ray's resource quantities are), got {args.num_cpus:g}")
    address = args.address if args.address is not None else os.environ.get("RAY_ADDRESS") or None
    if args.num_cpus is not None and address not in (None, "local"):
        where = "--address" if args.address is not None else "RAY_ADDRESS"
        raise ValueError(f"--num-cpus sizes the local Ray cluster this command starts; the cluster at {where} "
                         f"{address} has its own CPUs (give one or the other)")


RAY_RESOURCE_UNITS = 10_000  # Ray counts a resource in fixed point, 1e-4 of a unit (ray._raylet.RESOURCE_UNIT_SCALING)


def start_replicas(pool: Any) -> int:
    """The replicas a pool is deployed with, as `adapters/ray/app.engine_options` deploys it (autoscaling: its
    initial_replicas, the config's `replicas` within min_replicas..max_replicas); not imported from there, which
    imports Ray Serve (~1-4 s)."""
    t = pool.autoscaling
    return int(pool.replicas) if t is None else min(max(pool.replicas, t.min_replicas), t.max_replicas)


def check_pool_cpus(cfg: Any, num_cpus: float | None) -> None:
    """The pools' replicas at start (`start_replicas` x `num_cpus` each; the ingress asks none) fit in the local cluster
    --num-cpus sizes. Found by review (review69): `--num-cpus 1` beside a pool of 2 replicas asking 1 CPU each passed
    --dry-run, then Ray Serve waited for the second replica's CPU for ever, `serve.run` never returning. Counted as
    Ray counts (in 1e-4 units, so 10 x 1.1 CPU fit in 11) and with the replicas Ray starts (review70: 10 x 1.1 read as
    11.000000000000002 and an autoscaling pool's `replicas` above its max_replicas counted in full were refused; its
    `replicas` below min_replicas (0, say) counted as given, so too few CPUs passed). A pool's num_cpus or num_gpus
    between 0 and Ray's 1e-4 unit is refused here, as Ray refuses it at deploy (review71: --dry-run passed it)."""
    for p in cfg.pools:
        for name, quantity in (("num_cpus", p.num_cpus), ("num_gpus", p.num_gpus)):
            if quantity > 0 and int(quantity * RAY_RESOURCE_UNITS) == 0:
                raise ValueError(f"pool {p.name}: {name} {quantity:g} is below Ray's smallest quantity, 0.0001 "
                                 f"(Ray refuses it at deploy): use 0 or at least 0.0001")
    if num_cpus is None:
        return
    need = sum(round(p.num_cpus * RAY_RESOURCE_UNITS) * start_replicas(p) for p in cfg.pools)
    if need > round(num_cpus * RAY_RESOURCE_UNITS):
        asks = ", ".join(f"{p.name} {start_replicas(p)} x {p.num_cpus:g}" for p in cfg.pools if p.num_cpus)
        raise ValueError(f"--num-cpus {num_cpus:g} is fewer CPUs than the pools' replicas ask at start, "
                         f"{need / RAY_RESOURCE_UNITS:g} (replicas x num_cpus: {asks}); Ray Serve would wait for them "
                         f"for ever")


def _serve(args: argparse.Namespace, cfg: Any) -> int:
    import ray
    from ray import serve

    from kvsched.adapters.ray.app import build_app
    from kvsched.adapters.ray.proxy import controller_options

    # "local" where none is given: Ray's own default (None) joins a cluster `ray start` left on this machine (its
    # address file), which this command would then take for its own and stop Serve on (found by review71)
    address = (args.address if args.address is not None else os.environ.get("RAY_ADDRESS")) or "local"
    started = not ray.is_initialized() and address == "local"  # a local cluster, this command's to stop
    if not ray.is_initialized():
        try:
            ray.init(address=address, num_cpus=args.num_cpus, include_dashboard=False)
        except (ValueError, ConnectionError) as exc:  # a malformed address, no cluster at "auto", RAY_ADDRESS's
            print(f"kvsched ray-serve: error: Ray: {exc}", file=sys.stderr)  # cluster with --num-cpus: one line
            return 2
    # Ray's HTTP proxy reads no X-Session-Id of its own (a non-UTF-8 one was its 500) and refuses a body over the
    # limit before it queues it: kvsched/adapters/ray/proxy.py
    serve.start(http_options={"host": cfg.host, "port": cfg.port},
                controller_options=controller_options(cfg.max_body_bytes))
    if not started and cfg.app_name in serve.status().applications:  # a joined cluster's: another's, or one left
        print(f"kvsched ray-serve: error: the cluster already runs an application named {cfg.app_name!r}: serving "
              f"would replace it, and Ctrl-C delete it; give this config another app_name, or delete that application "
              f"first (serve.delete({cfg.app_name!r}))", file=sys.stderr)  # (found by review71: it replaced it)
        return 2
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    print(f"kvsched ray-serve: ready on {api_url(cfg)} (Ctrl-C stops it)")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    from kvsched.commands.ray_serve_stop import shut_down

    return shut_down(cfg.app_name, started)  # within seconds; a second Ctrl-C forces it (ray_serve_stop.py)


def api_url(cfg: Any) -> str:
    """The OpenAI base URL: the route prefix joined to `/v1` (found by review: a prefix such as `/api` read
    `/apiv1`)."""
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
