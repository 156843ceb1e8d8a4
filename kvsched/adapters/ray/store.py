"""The `store:` section of `kvsched ray-serve`'s YAML: the shared level every replica of every pool reads and writes
(KV blocks, session metadata, compaction summaries; see docs/shared_store.md).

```yaml
store:
  url: redis://10.0.0.5:6379/0      # or `local`: kvsched ray-serve starts a redis-server on loopback (one machine)
  kv_ttl_s: 3600                    # how long a KV block stays in the store after it was written
  state_ttl_s: 86400                # session metadata and compaction summaries
```

Checked by the config's `StoreSettings` model (kvsched.adapters.ray.config); applied by putting the settings into each
pool's engine environment (`KVSCHED_STORE_URL`, ...), which `vllm serve` hands to its API server and engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kvsched.adapters.ray.config import ConfigError, RayServeConfig, StoreSettings, read_yaml, validation_message

LOCAL = "local"
StoreSection = StoreSettings  # the section as kvsched ray-serve and the app builder read it


def store_section(raw: Any) -> StoreSection | None:
    """The validated `store:` mapping, or None when absent; ConfigError names the bad key (store.<key>)."""
    if raw is None:
        return None
    try:
        return StoreSettings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("; ".join(f"store.{m}" if not m.startswith("config:") else "store" + m[6:]
                                    for m in validation_message(exc).split("; "))) from None


def read_store_section(path: Path | str) -> StoreSection | None:
    raw = read_yaml(path)
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
