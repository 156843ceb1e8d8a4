"""The YAML file behind `kvsched ray-serve`: pools of vLLM engine replicas (each `vllm serve --scheduler kvsched`),
the router, autoscaling targets and the HTTP address. Every problem is a `ConfigError` naming the key.

```yaml
http: {host: 127.0.0.1, port: 8000}
router: {load_factor: 1.25, virtual_nodes: 100, load_floor: 0, stats_period_s: 2}
long_context_tokens: 12000          # sessions past this go to the pool with long_context: true
pools:
  - name: workers
    model: /models/llama-3.1-8b       # or kvsched-tiny:test (the locally built random-weight model)
    models: [llama-8b]                # names clients send as "model" (default: the pool name)
    roles: [worker]                   # X-Agent-Role values served here
    device: gpu                       # cpu | gpu (one GPU per replica unless num_gpus says otherwise)
    replicas: 2                       # or autoscaling: {min_replicas, max_replicas, queue_per_replica, ttft_p95_s}
    max_model_len: 8192
    vllm_args: [--kv-cache-dtype, fp8]
```
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsched.core.routing import RouterConfig, RoutingConfigError
from kvsched.core.routing_autoscale import AutoscaleTargets
from kvsched.core.routing_pools import PoolRouting, PoolRule

TINY_PREFIX = "kvsched-tiny:"


class ConfigError(ValueError):
    """The kvsched Ray config is malformed; the message names the offending key."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """One replica's `vllm serve` (see kvsched.serving.ServerSpec)."""

    model: str
    served_model_name: str
    scheduler: str | None = "kvsched"
    max_model_len: int = 2048
    block_size: int = 32
    kv_cache_gib: int = 1
    num_blocks: int | None = None
    vllm_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    startup_timeout_s: float = 600.0

    def model_path(self) -> Path:
        if self.model.startswith(TINY_PREFIX):
            from kvsched.tiny_model import ensure_tiny_model

            return ensure_tiny_model(self.model[len(TINY_PREFIX):] or "test")
        return Path(self.model)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    name: str
    engine: EngineConfig
    models: tuple[str, ...]
    roles: tuple[str, ...] = ()
    long_context: bool = False
    device: str = "cpu"
    replicas: int = 1
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64
    autoscaling: AutoscaleTargets | None = None

    def rule(self) -> PoolRule:
        return PoolRule(self.name, models=self.models, roles=self.roles, long_context=self.long_context)


@dataclass(frozen=True, slots=True)
class RayServeConfig:
    pools: tuple[PoolConfig, ...]
    router: RouterConfig = field(default_factory=RouterConfig)
    stats_period_s: float = 2.0
    long_context_tokens: int | None = None
    default_pool: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "kvsched"
    route_prefix: str = "/"
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    request_retries: int = 2

    def routing(self) -> PoolRouting:
        return PoolRouting(tuple(p.rule() for p in self.pools), long_context_tokens=self.long_context_tokens,
                           default_pool=self.default_pool)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_keys(where: str, raw: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def _mapping(where: str, raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__}")
    return raw


def _typed(where: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if isinstance(value, bool) and kind is not bool and (kind is int or (isinstance(kind, tuple) and bool not in kind)):
        raise ConfigError(f"{where} must be {getattr(kind, '__name__', kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ConfigError(f"{where} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


ENGINE_KEYS = {"model", "served_model_name", "scheduler", "max_model_len", "block_size", "kv_cache_gib", "num_blocks",
               "vllm_args", "env", "startup_timeout_s"}
POOL_KEYS = {"name", "models", "roles", "long_context", "device", "replicas", "num_cpus", "num_gpus",
             "max_ongoing_requests", "autoscaling"} | ENGINE_KEYS
TOP_KEYS = {"pools", "router", "long_context_tokens", "default_pool", "http", "app_name", "route_prefix",
            "health_check_period_s", "health_check_timeout_s", "request_retries",
            "store"}  # read by kvsched.adapters.ray.store


def parse_pool(i: int, raw: Any) -> PoolConfig:
    where = f"pools[{i}]"
    raw = _mapping(where, raw)
    _check_keys(where, raw, POOL_KEYS)
    if "model" not in raw or "name" not in raw:
        raise ConfigError(f"{where}: 'name' and 'model' are required")
    name = _typed(f"{where}.name", raw["name"], str)
    models = tuple(_typed(f"{where}.models", raw.get("models", [name]), list))
    roles = tuple(_typed(f"{where}.roles", raw.get("roles", []), list))
    for m in (*models, *roles):
        _typed(f"{where}.models/roles entries", m, str)
    device = raw.get("device", "cpu")
    if device not in ("cpu", "gpu"):
        raise ConfigError(f"{where}.device must be cpu or gpu, got {device!r}")
    engine_kw: dict[str, Any] = {k: raw[k] for k in ENGINE_KEYS & set(raw)}
    engine_kw["model"] = str(_typed(f"{where}.model", raw["model"], str))
    engine_kw.setdefault("served_model_name", models[0] if models else name)
    engine_kw["vllm_args"] = tuple(str(a) for a in _typed(f"{where}.vllm_args", raw.get("vllm_args", []), list))
    engine_kw["env"] = tuple((str(k), str(v)) for k, v in _mapping(f"{where}.env", raw.get("env")).items())
    for key in ("max_model_len", "block_size", "kv_cache_gib"):
        if key in engine_kw and (_typed(f"{where}.{key}", engine_kw[key], int) < 1):
            raise ConfigError(f"{where}.{key} must be >= 1")
    auto = None
    if raw.get("autoscaling") is not None:
        a = _mapping(f"{where}.autoscaling", raw["autoscaling"])
        allowed = {f.name for f in dataclasses.fields(AutoscaleTargets)}
        _check_keys(f"{where}.autoscaling", a, allowed)
        try:
            auto = AutoscaleTargets(**a)
        except (RoutingConfigError, TypeError) as exc:
            raise ConfigError(f"{where}.autoscaling: {exc}") from exc
    replicas = _typed(f"{where}.replicas", raw.get("replicas", auto.min_replicas if auto else 1), int)
    if replicas < (0 if auto else 1):
        raise ConfigError(f"{where}.replicas must be >= 1, got {replicas}")
    num_gpus = float(_typed(f"{where}.num_gpus", raw.get("num_gpus", 1 if device == "gpu" else 0), (int, float)))
    if device == "cpu" and num_gpus:
        raise ConfigError(f"{where}: device cpu with num_gpus {num_gpus}")
    max_ongoing = _typed(f"{where}.max_ongoing_requests", raw.get("max_ongoing_requests", 64), int)
    if max_ongoing < 1:
        raise ConfigError(f"{where}.max_ongoing_requests must be >= 1")
    return PoolConfig(name=name, engine=EngineConfig(**engine_kw), models=models, roles=roles,
                      long_context=bool(raw.get("long_context", False)), device=device, replicas=replicas,
                      num_cpus=float(_typed(f"{where}.num_cpus", raw.get("num_cpus", 0.0), (int, float))),
                      num_gpus=num_gpus, max_ongoing_requests=max_ongoing, autoscaling=auto)


def parse_config(raw: Any) -> RayServeConfig:
    raw = _mapping("config", raw)
    _check_keys("config", raw, TOP_KEYS)
    pools_raw = raw.get("pools")
    if not isinstance(pools_raw, list) or not pools_raw:
        raise ConfigError("config.pools must be a non-empty list")
    pools = tuple(parse_pool(i, p) for i, p in enumerate(pools_raw))
    router_raw = _mapping("router", raw.get("router"))
    _check_keys("router", router_raw, {"load_factor", "virtual_nodes", "kv_preference", "load_floor",
                                       "stats_period_s"})
    http = _mapping("http", raw.get("http"))
    _check_keys("http", http, {"host", "port"})
    try:
        router = RouterConfig(**{k: v for k, v in router_raw.items() if k != "stats_period_s"})
        cfg = RayServeConfig(
            pools=pools, router=router,
            stats_period_s=float(_typed("router.stats_period_s", router_raw.get("stats_period_s", 2.0),
                                        (int, float))),
            long_context_tokens=raw.get("long_context_tokens"), default_pool=raw.get("default_pool"),
            host=str(http.get("host", "127.0.0.1")), port=_typed("http.port", http.get("port", 8000), int),
            app_name=str(raw.get("app_name", "kvsched")), route_prefix=str(raw.get("route_prefix", "/")),
            health_check_period_s=float(raw.get("health_check_period_s", 2.0)),
            health_check_timeout_s=float(raw.get("health_check_timeout_s", 30.0)),
            request_retries=_typed("request_retries", raw.get("request_retries", 2), int))
        cfg.routing()  # pool names, long-context pool, default pool
    except RoutingConfigError as exc:
        raise ConfigError(str(exc)) from exc
    if cfg.stats_period_s <= 0:
        raise ConfigError("router.stats_period_s must be > 0")
    return cfg


def load_config(path: Path | str) -> RayServeConfig:
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(raw)


def config_from_dict(data: dict[str, Any]) -> RayServeConfig:
    """Rebuild a config from `RayServeConfig.to_dict()` (how it travels to Ray replicas)."""
    pools = []
    for p in data["pools"]:
        eng = dict(p["engine"], vllm_args=tuple(p["engine"]["vllm_args"]),
                   env=tuple(tuple(kv) for kv in p["engine"]["env"]))
        auto = AutoscaleTargets(**p["autoscaling"]) if p.get("autoscaling") else None
        pools.append(PoolConfig(**dict(p, engine=EngineConfig(**eng), models=tuple(p["models"]),
                                       roles=tuple(p["roles"]), autoscaling=auto)))
    return RayServeConfig(**dict(data, pools=tuple(pools), router=RouterConfig(**data["router"])))
