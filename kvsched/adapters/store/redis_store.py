"""kvsched's shared level on Redis (`kvsched.core.shared_state.SharedStore`): block payloads and session state, with
TTLs, behind one guard that keeps a store outage from costing requests anything.

Every call goes through `StoreHealth`: while the store is down, calls are skipped (a get is a miss, a put is dropped)
until the next reconnect attempt is due (exponential backoff up to 30 s); the outage is logged once when it starts and
once when the store is back. Timeouts are short (a loopback or same-rack Redis answers in well under a millisecond),
so a hung store costs one timeout per backoff period, not one per request. redis-py's own retries are off: the
backoff is ours.

One client per URL per process (`open_store`): the scheduler and the worker of one engine share it, and its outage
log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from kvsched.core.shared_state import MAX_TTL_S
from kvsched.core.store_health import StoreHealth

logger = logging.getLogger("vllm.kvsched.store")
T = TypeVar("T")
SOCKET_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 0.25


class StoreConfigError(ValueError):
    """A store URL kvsched cannot use (the message names it)."""


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
        raise StoreConfigError(f"the shared store must be a redis://HOST:PORT[/DB] URL, got {url!r}")
    return url


def redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisStore:
    def __init__(self, url: str, clock: Callable[[], float] = time.monotonic,
                 socket_timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = check_url(url)
        self.client = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                           socket_connect_timeout=min(CONNECT_TIMEOUT_S, socket_timeout_s),
                                           retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.health = StoreHealth(clock)
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"calls": 0, "failed_calls": 0, "skipped_calls": 0}
        self._down_since = 0.0

    # ---- the guard ----------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], default: T) -> T:
        with self._lock:
            if not self.health.may_try():
                self.counters["skipped_calls"] += 1
                return default
        try:
            out = fn()
        except self.errors as exc:
            with self._lock:
                self.counters["failed_calls"] += 1
                went_down = self.health.failed()
            if went_down:
                self._down_since = time.monotonic()
                logger.warning("kvsched shared store %s unreachable (%s): serving without it (recomputing what it "
                               "held); reconnecting with backoff", redacted(self.url), exc)
            return default
        with self._lock:
            self.counters["calls"] += 1
            back = self.health.succeeded()
        if back:
            logger.warning("kvsched shared store %s reachable again after %.1f s", redacted(self.url),
                           time.monotonic() - self._down_since)
        return out

    @property
    def up(self) -> bool:
        return self.health.up

    def ping(self) -> bool:
        return self._call(lambda: bool(self.client.ping()), False)

    # ---- SharedStore ------------------------------------------------------------------------------------------------
    def put_blocks(self, items: Mapping[str, bytes], ttl_s: float) -> bool:
        if not items:
            return True
        ms = _ms(ttl_s)

        def put() -> bool:
            pipe = self.client.pipeline(transaction=False)
            for k, v in items.items():
                pipe.set(k, v, px=ms)
            pipe.execute()
            return True

        return self._call(put, False)

    def get_blocks(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        return self._call(lambda: list(self.client.mget(list(keys))), [None] * len(keys))

    def has_blocks(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []

        def has() -> list[bool]:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.exists(k)
            return [bool(n) for n in pipe.execute()]

        return self._call(has, [False] * len(keys))

    def delete_blocks(self, keys: Sequence[str]) -> bool:
        return self._call(lambda: bool(self.client.delete(*keys) or True), False) if keys else True

    def put_state(self, key: str, value: str, ttl_s: float) -> bool:
        return self._call(lambda: bool(self.client.set(key, value.encode(), px=_ms(ttl_s))), False)

    def get_state(self, key: str) -> str | None:
        raw: Any = self._call(lambda: self.client.get(key), None)
        return raw.decode() if isinstance(raw, bytes) else raw

    def get_states(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        raw = self._call(lambda: list(self.client.mget(list(keys))), [None] * len(keys))
        return [r.decode() if isinstance(r, bytes) else r for r in raw]

    def delete_state(self, key: str) -> bool:
        return self._call(lambda: bool(self.client.delete(key) or True), False)

    def stats(self) -> dict[str, float]:
        return {"store_up": float(self.health.up), "store_outages": float(self.health.outages),
                "store_failed_calls": float(self.counters["failed_calls"]),
                "store_skipped_calls": float(self.counters["skipped_calls"])}


_STORES: dict[str, RedisStore] = {}
_STORES_LOCK = threading.Lock()


def open_store(url: str) -> RedisStore:
    """The process's client for `url` (one per URL: shared connection pool and outage log)."""
    with _STORES_LOCK:
        store = _STORES.get(url)
        if store is None:
            store = _STORES[url] = RedisStore(url)
        return store


def _ms(ttl_s: float) -> int:
    """A TTL in Redis's milliseconds: at least 1, at most `MAX_TTL_S` (inf or 1e300 would overflow; never raises)."""
    return max(1, int(min(ttl_s, MAX_TTL_S) * 1000)) if ttl_s == ttl_s else int(MAX_TTL_S * 1000)
