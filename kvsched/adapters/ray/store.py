"""The `store:` section of `kvsched ray-serve`'s YAML: the shared level every replica of every pool reads and writes
(KV blocks, session metadata, compaction summaries; see docs/shared_store.md).

```yaml
store:
  url: redis://10.0.0.5:6379/0      # or `local`: kvsched ray-serve starts a redis-server on loopback (one machine)
  kv_ttl_s: 3600                    # how long a KV block stays in the store after it was written
  state_ttl_s: 86400                # session metadata and compaction summaries
```

Checked by its own function (the config's `store` field calls it); applied by putting the settings into each
pool's engine environment (`KVSCHED_STORE_URL`, ...), which `vllm serve` hands to its API server and engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvsched.adapters.ray.config import ConfigError, RayServeConfig

LOCAL = "local"
KEYS = {"url", "kv_ttl_s", "state_ttl_s", "maxmemory_mb"}


@dataclass(frozen=True, slots=True)
class StoreSection:
    url: str
    kv_ttl_s: float | None = None
    state_ttl_s: float | None = None
    maxmemory_mb: int = 1024

    @property
    def local(self) -> bool:
        return self.url == LOCAL


def store_section(raw: Any) -> StoreSection | None:
    """The validated `store:` mapping, or None when absent; ConfigError names the bad key."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"store must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise ConfigError(f"store: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(KEYS))}")
    url = raw.get("url")
    if not isinstance(url, str) or not url:
        raise ConfigError("store.url is required: redis://HOST:PORT[/DB] or local")
    if url != LOCAL:
        from kvsched.adapters.store.redis_store import StoreConfigError, check_url

        try:
            check_url(url)
        except StoreConfigError as exc:
            raise ConfigError(f"store.url: {exc}") from exc
    ttls: dict[str, float | None] = {}
    for key in ("kv_ttl_s", "state_ttl_s"):
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value <= 0):
            raise ConfigError(f"store.{key} must be a number of seconds > 0, got {value!r}")
        ttls[key] = float(value) if value is not None else None
    mem = raw.get("maxmemory_mb", 1024)
    if isinstance(mem, bool) or not isinstance(mem, int) or mem < 16:
        raise ConfigError(f"store.maxmemory_mb must be an integer >= 16, got {mem!r}")
    return StoreSection(url, ttls["kv_ttl_s"], ttls["state_ttl_s"], mem)


def read_store_section(path: Path | str) -> StoreSection | None:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return store_section(raw.get("store") if isinstance(raw, dict) else None)


def with_store(cfg: RayServeConfig, url: str, section: StoreSection | None = None) -> RayServeConfig:
    """`cfg` with every pool's engines pointed at the store `url`."""
    env = {"KVSCHED_STORE_URL": url}
    if section is not None and section.kv_ttl_s:
        env["KVSCHED_STORE_KV_TTL_S"] = str(section.kv_ttl_s)
    if section is not None and section.state_ttl_s:
        env["KVSCHED_STORE_STATE_TTL_S"] = str(section.state_ttl_s)
    pools = [p.model_copy(update={"engine": p.engine.model_copy(update={"env": {**p.engine.env, **env}})})
             for p in cfg.pools]
    return cfg.model_copy(update={"pools": pools})
