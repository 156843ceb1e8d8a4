"""The disk and shared levels' settings: `--kvsched-disk-tier-dir/-gb`, `--kvsched-store-url` (carried in
kv_connector_extra_config) and their KVSCHED_* variables, each refused at start with the flag or variable named."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvsched.core.disk_tier import DiskConfigError, parse_disk_gib
from kvsched.core.env import env_setting
from kvsched.core.shared_state import DEFAULT_KV_TTL_S, DEFAULT_STATE_TTL_S, MAX_TTL_S

ENV_DISK_DIR = "KVSCHED_DISK_TIER_DIR"
ENV_DISK_GB = "KVSCHED_DISK_TIER_GB"
ENV_STORE_URL = "KVSCHED_STORE_URL"
ENV_KV_TTL = "KVSCHED_STORE_KV_TTL_S"
ENV_STATE_TTL = "KVSCHED_STORE_STATE_TTL_S"
ENV_REPLICA = "KVSCHED_REPLICA_NAME"
ENV_FETCH_MB = "KVSCHED_TIER_FETCH_MB"
# A worker's background fetch reads at most this much at once: one MGET's reply, or one run of disk reads (at least one
# block). 64 MiB is ~24 blocks of Llama-3-70B in FP8 (2.6 MiB per 16 tokens), ~0.1 s of a Redis client's get rate
# here (docs/shared_store.md): the memory a restore takes stays bounded, however long the session.
DEFAULT_FETCH_MB = 64.0
MAX_FETCH_MB = 65536.0

logger = logging.getLogger("vllm.kvsched.fp8_tier")  # the tier connector's logger


@dataclass(frozen=True, slots=True)
class LevelsConfig:
    disk_dir: str | None = None
    disk_gb: float | None = None
    store_url: str | None = None
    kv_ttl_s: float = DEFAULT_KV_TTL_S
    state_ttl_s: float = DEFAULT_STATE_TTL_S
    replica: str = ""
    fetch_mb: float = DEFAULT_FETCH_MB

    @property
    def fetch_bytes(self) -> int:
        return int(self.fetch_mb * 2**20)

    @property
    def enabled(self) -> bool:
        return bool(self.disk_dir or self.store_url)

    @classmethod
    def from_extra(cls, extra: dict[str, Any], check_file_system: bool = False) -> LevelsConfig:
        """From kv_connector_extra_config (set by --kvsched-disk-tier-dir/-gb, --kvsched-store-url), else the
        environment. DiskConfigError names a bad value. A disk size larger than the file system holding its directory
        is refused with `check_file_system` (the API server's parse-time checks, where the operator reads it); without
        it (the engine core's and workers' connectors) it is capped to that file system, logged. Found by review: the
        check ran in every process, so on a multi-node layout a worker whose file system is smaller than the API
        server's raised after the model had loaded."""
        disk_dir = extra.get("disk_dir") or env_setting(os.environ, ENV_DISK_DIR)  # blanks: unset (core.env)
        if disk_dir and (error := not_a_directory(str(disk_dir))):
            raise DiskConfigError(f"{'--kvsched-disk-tier-dir' if extra.get('disk_dir') else ENV_DISK_DIR}: {error}")
        gb_raw = extra["disk_gb"] if "disk_gb" in extra else env_setting(os.environ, ENV_DISK_GB)
        gb_name = "--kvsched-disk-tier-gb" if "disk_gb" in extra else ENV_DISK_GB
        gb = parse_disk_gib(gb_raw, gb_name) if gb_raw not in (None, "", "auto") else None
        if gb is not None and not disk_dir:
            raise DiskConfigError(f"{gb_name} needs --kvsched-disk-tier-dir (or {ENV_DISK_DIR})")
        if gb is not None and (total := file_system_bytes(str(disk_dir))) and gb * 2**30 > total:
            too_big = (f"{gb_name}: {gb:g} GiB is more than the whole file system holding {str(disk_dir)!r} "
                       f"({total / 2**30:.1f} GiB)")
            if check_file_system:
                raise DiskConfigError(f"{too_big}; give a smaller size")
            logger.warning("kvsched: %s on this host; the disk level is capped to %.1f GiB", too_big, total / 2**30)
            gb = total / 2**30
        url = extra.get("store_url") or env_setting(os.environ, ENV_STORE_URL)
        if url:
            from kvsched.adapters.store.redis_store import check_url, unredacted

            try:  # a redacted URL (a password moved out of the logged config, tier_config) is the environment's
                url = check_url(unredacted(str(url), ENV_STORE_URL))
            except ValueError as exc:
                raise DiskConfigError(f"{'--kvsched-store-url' if extra.get('store_url') else ENV_STORE_URL}: "
                                      f"{exc}") from None
        return cls(disk_dir=str(disk_dir) if disk_dir else None, disk_gb=gb, store_url=str(url) if url else None,
                   kv_ttl_s=ttl_setting(ENV_KV_TTL, extra.get("kv_ttl_s"), DEFAULT_KV_TTL_S, "kv_ttl_s"),
                   state_ttl_s=ttl_setting(ENV_STATE_TTL, extra.get("state_ttl_s"), DEFAULT_STATE_TTL_S, "state_ttl_s"),
                   replica=str(extra.get("replica") or env_setting(os.environ, ENV_REPLICA)
                               or f"{socket.gethostname()}/{os.getpid()}"),
                   fetch_mb=fetch_mb_setting(extra.get("fetch_mb")))


def not_a_directory(path: str) -> str | None:
    """Why `path` can never be the disk level's directory (it, or the nearest of its parents that exists, is not a
    directory), else None. Found by review: a regular file given as the directory was accepted, and the level was
    dropped at run time with one ERROR line; a directory that fails later (full, read-only, removed) still only turns
    the level off (tier_levels)."""
    for p in (Path(path), *Path(path).parents):
        try:
            if p.exists():
                return None if p.is_dir() else f"{str(p)!r} exists and is not a directory"
        except OSError:  # a parent this user may not search (found by review: it raised out of the start-up checks)
            return None  # (then the level's own start-up guard turns it off, logged)
    return None


def file_system_bytes(path: str) -> int | None:
    """The size of the file system `path` is (or would be, once created) on: its nearest existing parent's; None if
    unknown. Found by review: a disk level of 1e300 GiB was accepted."""
    for p in (Path(path), *Path(path).parents):
        try:
            if p.exists():
                st = os.statvfs(p)
                return int(st.f_blocks * st.f_frsize)
        except OSError:
            return None
    return None


def ttl_setting(env: str, given: Any, default: float, key: str = "") -> float:
    """A store TTL in seconds: `given` (kv_connector_extra_config's `key`), else the variable `env`, else `default`;
    shared with the API server's compaction checkpoints (compaction_shared) so both keep state equally long. inf and
    1e300 overflowed the store's millisecond TTL on every write: at most ten years."""
    return _positive(key if given is not None else env, given if given is not None else os.environ.get(env), default,
                     MAX_TTL_S, "seconds", " (ten years)")


def fetch_mb_setting(given: Any) -> float:
    """The background fetch's chunk in MiB: `given` (kv_connector_extra_config), else KVSCHED_TIER_FETCH_MB, else
    the default."""
    name, raw = ("fetch_mb", given) if given is not None else (ENV_FETCH_MB, os.environ.get(ENV_FETCH_MB))
    return _positive(name, raw, DEFAULT_FETCH_MB, MAX_FETCH_MB, "MiB")


def _positive(name: str, raw: Any, default: float, most: float, unit: str, note: str = "") -> float:
    """A number in (0, most] (NaN fails too), else `default` when unset or blank; errors name `name`, where `raw` came
    from (found by review: a bad kv_ttl_s or fetch_mb in --kv-transfer-config was reported as the variable's)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    try:
        if isinstance(raw, bool):  # JSON true is not a number of anything
            raise TypeError
        value = float(raw)
    except (TypeError, ValueError):
        raise DiskConfigError(f"{name} must be a number of {unit}, got {raw!r}") from None
    if not 0 < value <= most:
        raise DiskConfigError(f"{name} must be > 0 and at most {most:.0f} {unit}{note}, got {raw!r}")
    return value
