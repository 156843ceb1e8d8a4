"""The YAML file behind `kvsched ray-serve`: pools of vLLM engine replicas (each `vllm serve --scheduler kvsched`),
the router, autoscaling targets and the HTTP address. Pydantic models, strict (no "8k" for an integer, no `true` for
a count) and closed (an unknown key is an error); every problem is one `ConfigError` naming the key.

```yaml
http: {host: 127.0.0.1, port: 8000}
router: {load_factor: 1.25, virtual_nodes: 100, load_floor: auto, stats_period_s: 2, unnamed: opening,
         poll_deadline_s: 5, routing_wait_s: 2}   # a replica's poll of its engine; Ray's routing call's wait for it
long_context_tokens: 12000          # sessions past this go to the pool with long_context: true
pools:
  - name: workers
    model: /models/llama-3.1-8b       # or kvsched-tiny:test (the locally built random-weight model)
    models: [llama-8b]                # names clients send as "model" (default: the pool name)
    roles: [worker]                   # X-Agent-Role values served here
    device: gpu                       # cpu | gpu (one GPU per replica unless num_gpus says otherwise)
    replicas: 2                       # or autoscaling: {min_replicas, max_replicas, queue_per_replica, ttft_p95_s,
                                      #   look_back_period_s, unscraped_grace_s, ttft_hold_s, ...}:
                                      #   kvsched.core.routing_autoscale.AutoscaleTargets
    max_model_len: 8192
    vllm_args: [--kv-cache-dtype, fp8]
    worker: default                   # or in_engine: the model worker in the engine-core process (ServerSpec.worker;
                                      #   one rank: vllm_args with -tp/-pp above 1 or another executor, their
                                      #   --config file's included, are refused: a file only the replicas' machines
                                      #   hold by each replica, before its engine starts)
```
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from kvsched.adapters.http_body import BODY_TIMEOUT_S
from kvsched.adapters.ray.poll_settings import POLL_DEADLINE_S, ROUTING_WAIT_S, poll_problems
from kvsched.adapters.ray.requests import MAX_BODY_BYTES, MAX_JSON_DEPTH
from kvsched.core.routing import RouterConfig, RoutingConfigError
from kvsched.core.routing_autoscale import AutoscaleTargets
from kvsched.core.routing_pools import PoolRouting, PoolRule
from kvsched.core.shared_state import MAX_TTL_S
from kvsched.serving_in_engine import Worker, in_engine_conflict

TINY_PREFIX = "kvsched-tiny:"


class ConfigError(ValueError):
    """The kvsched Ray config is malformed; the message names the offending key."""


def _as_str(v: Any) -> Any:
    """Command-line words and environment values: YAML may read `192` or `true` where a string is meant."""
    return str(v).lower() if isinstance(v, bool) else str(v) if isinstance(v, int | float) else v


Word = Annotated[str, BeforeValidator(_as_str)]
PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
StoreTTL = Annotated[float, Field(gt=0, le=MAX_TTL_S)]  # finite: the store keeps it in milliseconds


class _Strict(BaseModel):
    # allow_inf_nan: YAML reads `.inf` as a float, which passed `gt=0` (a deadline never reached; num_cpus overflowing
    # in build_app): every number here must be finite
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class EngineConfig(_Strict):
    """One replica's `vllm serve` (see kvsched.serving.ServerSpec)."""

    model: str
    served_model_name: str
    scheduler: str | None = "kvsched"
    max_model_len: PositiveInt = 2048
    block_size: PositiveInt = 32
    kv_cache_gib: PositiveInt = 1
    num_blocks: PositiveInt | None = None
    vllm_args: list[Word] = []
    env: dict[str, Word] = {}
    startup_timeout_s: PositiveFloat = 600.0
    worker: Worker = "default"  # "in_engine": one vLLM process fewer a replica on the CPU build (ServerSpec.worker)

    @field_validator("env")
    @classmethod
    def _settings(cls, env: dict[str, str]) -> dict[str, str]:
        """The policy core's KVSCHED_* settings among the replicas' environment, refused here (naming each) rather
        than by every replica as it starts. The core's check only: parsing must not import vLLM."""
        from kvsched.core.settings_check import setting_errors

        if errors := setting_errors(env):
            raise ValueError("; ".join(errors))
        return env

    @model_validator(mode="after")
    def _layout(self) -> EngineConfig:
        """`worker: in_engine` with vLLM arguments it cannot honour (more ranks, another executor) is refused here,
        not left to hang every replica's start-up or be ignored (kvsched.serving_in_engine.in_engine_conflict). A
        `--config FILE` among them names a file on the replicas' machines: read here when it can be, else left to each
        replica, which checks it before its engine starts (engine.replica_spec). Found by review: a file only the
        replicas' machines held was refused here ("cannot read it"), so such a pool could not be deployed at all."""
        if self.worker == "in_engine" and (conflict := in_engine_conflict(self.vllm_args, file_elsewhere=True)):
            raise ValueError(f"vllm_args {conflict}")
        return self

    def model_path(self) -> Path:
        if self.model.startswith(TINY_PREFIX):
            from kvsched.tiny_model import ensure_tiny_model

            return ensure_tiny_model(self.model[len(TINY_PREFIX):] or "test")
        return Path(self.model)


ENGINE_KEYS = frozenset(EngineConfig.model_fields)
AUTOSCALING_KEYS = frozenset(f.name for f in dataclasses.fields(AutoscaleTargets))
# The autoscaling section, read by a strict model of AutoscaleTargets' own fields before the dataclass is built: found
# by review, the dataclass built straight from the YAML escaped this file's checks (finite numbers, no `true` for a
# count), so `upscale_delay_s: .nan` passed and failed later in Ray's AutoscalingConfig.
_TARGET_TYPES = typing.get_type_hints(AutoscaleTargets)
# Ray Serve's `AutoscalingConfig.metrics_interval_s` (its default, which kvsched leaves as it is): how often a replica
# pushes its autoscaling points to the controller. Ray warns that a look-back window no longer than it "will raise an
# exception in a future release": the policy would decide on windows that end up to one push before the decision.
RAY_METRICS_INTERVAL_S = 10.0
AutoscalingFields: type[BaseModel] = create_model(  # type: ignore[call-overload]
    "AutoscalingFields", __base__=_Strict,
    **{f.name: (_TARGET_TYPES[f.name], f.default) for f in dataclasses.fields(AutoscaleTargets)})


def _within_ray(targets: AutoscaleTargets | None) -> AutoscaleTargets | None:
    """The targets, refused (RoutingConfigError) where Ray Serve would warn or refuse their window."""
    if targets is not None and targets.look_back_period_s <= RAY_METRICS_INTERVAL_S:
        raise RoutingConfigError(f"look_back_period_s must be > {RAY_METRICS_INTERVAL_S:g} s (Ray Serve's "
                                 f"metrics_interval_s: how often a replica pushes its autoscaling points), got "
                                 f"{targets.look_back_period_s!r}")
    return targets


class PoolConfig(_Strict):
    """One pool; in YAML the engine's keys (model, max_model_len, vllm_args, ...) sit beside the pool's."""

    name: str
    engine: EngineConfig
    models: list[str] = []
    roles: list[str] = []
    long_context: bool = False
    device: Literal["cpu", "gpu"] = "cpu"
    replicas: int = 1
    num_cpus: Annotated[float, Field(ge=0)] = 0.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    max_ongoing_requests: PositiveInt = 64
    autoscaling: AutoscaleTargets | None = None

    @model_validator(mode="before")
    @classmethod
    def _flat_yaml(cls, raw: Any) -> Any:
        """The YAML layout (engine keys beside the pool's) to the nested one, with the defaults that depend on
        other keys: models (the pool name), served_model_name (the first model), num_gpus (1 on a GPU pool),
        replicas (autoscaling's minimum)."""
        if not isinstance(raw, dict) or "engine" in raw:
            return raw
        if "model" not in raw or "name" not in raw:
            raise ValueError("'name' and 'model' are required")
        out = {k: v for k, v in raw.items() if k not in ENGINE_KEYS}
        engine = {k: v for k, v in raw.items() if k in ENGINE_KEYS}
        out.setdefault("models", [raw["name"]])
        models = out["models"]
        first = models[0] if isinstance(models, list) and models else None
        engine.setdefault("served_model_name", first if isinstance(first, str) else raw["name"])
        out["engine"] = engine
        out.setdefault("num_gpus", 1.0 if raw.get("device") == "gpu" else 0.0)
        auto = raw.get("autoscaling")
        if "replicas" not in out and isinstance(auto, dict) and isinstance(auto.get("min_replicas"), int):
            out["replicas"] = auto["min_replicas"]
        return out

    @field_validator("autoscaling", mode="before")
    @classmethod
    def _targets(cls, raw: Any) -> Any:
        if raw is None or isinstance(raw, AutoscaleTargets):
            return _within_ray(raw)
        if not isinstance(raw, dict):
            raise ValueError(f"must be a mapping, got {type(raw).__name__}")
        unknown = sorted(set(raw) - AUTOSCALING_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(AUTOSCALING_KEYS))}")
        try:
            fields = AutoscalingFields.model_validate(raw)
        except ValidationError as exc:
            raise ValueError(validation_message(exc)) from None
        try:
            return _within_ray(AutoscaleTargets(**fields.model_dump()))
        except (RoutingConfigError, TypeError) as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> PoolConfig:
        if self.replicas < (0 if self.autoscaling else 1):
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.device == "cpu" and self.num_gpus:
            raise ValueError(f"device cpu with num_gpus {self.num_gpus}")
        return self

    def rule(self) -> PoolRule:
        return PoolRule(self.name, models=tuple(self.models), roles=tuple(self.roles), long_context=self.long_context)


class RouterSettings(_Strict):
    """kvsched.core.routing.RouterConfig's settings, `stats_period_s` (how often replicas report), `load_floor`
    `auto`: half of each pool's `max_ongoing_requests` (measured reason: BENCHMARKS.md, router section), and each
    replica's poll of its engine: `poll_deadline_s`, `routing_wait_s` (poll_settings.py, which checks them)."""

    load_factor: float = 1.25
    virtual_nodes: int = 100
    kv_preference: bool = True
    load_floor: int | Literal["auto"] = "auto"
    session_idle_s: float = 600.0
    stats_period_s: PositiveFloat = 2.0
    poll_deadline_s: PositiveFloat = POLL_DEADLINE_S
    routing_wait_s: PositiveFloat = ROUTING_WAIT_S
    # requests naming no session: "opening" routes a chat conversation by its opening messages, so its turns stay
    # where its KV is (kvsched.adapters.ray.opening); "least_loaded", the replica with the fewest in flight
    unnamed: Literal["opening", "least_loaded"] = "opening"

    @model_validator(mode="after")
    def _core_checks(self) -> RouterSettings:
        self.core(64)
        if problems := poll_problems(self.poll_deadline_s, self.routing_wait_s, self.stats_period_s):
            raise ValueError("; ".join(problems))
        return self

    def core(self, max_ongoing_requests: int) -> RouterConfig:
        """The routing core's config for a pool whose replicas take `max_ongoing_requests` each."""
        floor = max_ongoing_requests // 2 if self.load_floor == "auto" else self.load_floor
        try:
            return RouterConfig(load_factor=self.load_factor, virtual_nodes=self.virtual_nodes,
                                kv_preference=self.kv_preference, load_floor=floor,
                                session_idle_s=self.session_idle_s)
        except RoutingConfigError as exc:
            raise ValueError(str(exc)) from None


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000


class StoreSettings(_Strict):
    """The `store:` section: the shared level every replica of every pool reads and writes (kvsched.adapters.ray.store
    applies it; docs/shared_store.md)."""

    url: str  # redis://HOST:PORT[/DB], or `local`: kvsched ray-serve starts a redis-server on loopback
    kv_ttl_s: StoreTTL | None = None  # how long a KV block stays in the store after it was written
    state_ttl_s: StoreTTL | None = None  # session metadata and compaction summaries
    maxmemory_mb: Annotated[int, Field(ge=16)] = 1024

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        if url == "local":
            return url
        from kvsched.adapters.store.redis_store import StoreConfigError, check_url

        try:
            return check_url(url)
        except StoreConfigError as exc:
            raise ValueError(str(exc)) from None

    @property
    def local(self) -> bool:
        return self.url == "local"


class RayServeConfig(_Strict):
    pools: Annotated[list[PoolConfig], Field(min_length=1)]
    # validated with each config, not once at import: its check reads Ray's environment (poll_settings.py), and a
    # default built at import made a low RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S crash every import of this file
    router: RouterSettings = Field(default_factory=dict, validate_default=True)
    http: HttpConfig = HttpConfig()
    long_context_tokens: PositiveInt | None = None
    default_pool: str | None = None
    app_name: str = "kvsched"
    route_prefix: str = "/"
    health_check_period_s: PositiveFloat = 2.0
    health_check_timeout_s: PositiveFloat = 30.0
    request_retries: Annotated[int, Field(ge=0)] = 2
    request_deadline_s: PositiveFloat = 300.0  # arrival to answer (or first streamed bytes), retries included
    max_body_bytes: PositiveInt = MAX_BODY_BYTES  # 64 MiB, as kvsched's vLLM middleware
    max_json_depth: PositiveInt = MAX_JSON_DEPTH  # 128, as kvsched's vLLM middleware
    body_timeout_s: PositiveFloat = BODY_TIMEOUT_S  # a body not all arrived by then: 408 (ingress_body.py)
    store: StoreSettings | None = None

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, v: str) -> str:
        """Ray Serve's rules (`validate_route_prefix`), checked here so that `--dry-run` catches them (found by review:
        `api/` passed the check and failed in `serve.run`)."""
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        if v != "/" and v.endswith("/"):
            raise ValueError(f"must not end with '/', got {v!r} (use {v.rstrip('/') or '/'!r})")
        if "{" in v or "}" in v:
            raise ValueError(f"must not hold '{{' or '}}', got {v!r}")
        return v

    @model_validator(mode="after")
    def _routable(self) -> RayServeConfig:
        try:
            self.routing()
        except RoutingConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def host(self) -> str:
        return self.http.host

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def stats_period_s(self) -> float:
        return self.router.stats_period_s

    def routing(self) -> PoolRouting:
        return PoolRouting(tuple(p.rule() for p in self.pools), long_context_tokens=self.long_context_tokens,
                           default_pool=self.default_pool)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")


UNION_TAGS = frozenset({"engine", "int", "float", "str", "bool", "none", "list", "dict"})  # not keys: nesting, union arms


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in UNION_TAGS and "[" not in part and not part.startswith("function-"):
            out += f".{part}" if out else part
    return out or "config"


def validation_message(exc: ValidationError) -> str:
    msgs = []
    for e in exc.errors(include_url=False):
        where = _where(tuple(e["loc"]))
        if e["type"] == "extra_forbidden":
            msgs.append(f"{where}: unknown key")
        else:
            msgs.append(f"{where}: {str(e['msg']).removeprefix('Value error, ')}")
    return "; ".join(dict.fromkeys(msgs))


def parse_config(raw: Any) -> RayServeConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping, got {type(raw).__name__}")
    try:
        return RayServeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc)) from None


def read_yaml(path: Path | str) -> Any:
    """The config file's YAML, or a ConfigError saying why not (the config and its `store:` section read it alike)."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:  # found by review: bytes that are no UTF-8 were a traceback
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:  # found by review: YAML nested some thousand levels deep was a traceback
        raise ConfigError(f"{path}: not valid YAML: nested too deep") from None


def load_config(path: Path | str) -> RayServeConfig:
    return parse_config(read_yaml(path))


def config_from_dict(data: dict[str, Any]) -> RayServeConfig:
    """Rebuild a config from `RayServeConfig.to_dict()` (how it travels to Ray replicas)."""
    return RayServeConfig.model_validate(data, strict=False)
