"""kvsched's shared level on Redis (`kvsched.core.shared_state.SharedStore`): block payloads and session state, with
TTLs, behind one guard that keeps a store outage from costing requests anything.

Every call goes through `StoreHealth`: while the store is down, calls are skipped (a get is a miss, a put is dropped)
until the next reconnect attempt is due (exponential backoff up to 30 s); the outage is logged once when it starts and
once when the store is back. Timeouts are short (a loopback or same-rack Redis answers in well under a millisecond),
so a hung store costs one timeout per backoff period, not one per request. redis-py's own retries are off: the
backoff is ours.

The URL is checked by `store_url.check_url` (which keeps it from lengthening these bounds).

One client per URL per process (`open_store`): the scheduler and the worker of one engine share it, and its outage
log.

Only a store that cannot be reached (a connection error, a timeout, an OS error) is an outage. An error *reply*
(OOM under `noeviction`, WRONGTYPE on a key another program wrote) fails that one call, counted and logged once: the
server answers, so the other calls go on. A value that is not UTF-8 text where state is expected is a miss, counted.
URLs are logged and quoted only `redacted` (no password, in the user part or a `password=` / `ssl_password=` query
parameter).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from kvsched.adapters.store.store_url import CONNECT_TIMEOUT_S as CONNECT_TIMEOUT_S
from kvsched.adapters.store.store_url import SOCKET_TIMEOUT_S as SOCKET_TIMEOUT_S
from kvsched.adapters.store.store_url import StoreConfigError as StoreConfigError
from kvsched.adapters.store.store_url import check_url as check_url
from kvsched.adapters.store.store_url import has_secret as has_secret
from kvsched.adapters.store.store_url import is_redacted as is_redacted
from kvsched.adapters.store.store_url import redacted as redacted
from kvsched.adapters.store.store_url import unredacted as unredacted
from kvsched.core.shared_state import MAX_TTL_S
from kvsched.core.store_health import StoreHealth

logger = logging.getLogger("vllm.kvsched.store")
T = TypeVar("T")
UPDATE_ATTEMPTS = 16  # tries of one `update_state` while other clients write the same key


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
        # an outage: the store cannot be reached. Any other RedisError is the server's answer to that one call
        self.outage_errors: tuple[type[BaseException], ...] = (redis.ConnectionError, redis.TimeoutError, OSError)
        self.call_errors: tuple[type[BaseException], ...] = (redis.RedisError,)
        self.health = StoreHealth(clock)
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"calls": 0, "failed_calls": 0, "skipped_calls": 0, "error_replies": 0,
                                         "bad_values": 0, "contended_updates": 0}
        self._down_since = 0.0

    # ---- the guard ----------------------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], default: T) -> T:
        with self._lock:
            if not self.health.may_try():
                self.counters["skipped_calls"] += 1
                return default
            began = self.health.epoch  # other threads' calls run meanwhile: see StoreHealth.succeeded
        try:
            out = fn()
        except self.outage_errors as exc:
            with self._lock:
                self.counters["failed_calls"] += 1
                went_down = self.health.failed(began)
            if went_down:
                self._down_since = time.monotonic()
                logger.warning("kvsched shared store %s unreachable (%s): serving without it (recomputing what it "
                               "held); reconnecting with backoff", redacted(self.url), exc)
            return default
        except self.call_errors as exc:  # the server answered with an error (OOM, WRONGTYPE, ...): this call only
            with self._lock:
                self.counters["error_replies"] += 1
                first = self.counters["error_replies"] == 1
                back = self.health.succeeded(began)
            if first:
                logger.warning("kvsched shared store %s answered with an error (%s): that call went on without the "
                               "store; the store stays in use (further error replies are counted in "
                               "store_error_replies, not logged)", redacted(self.url), exc)
            self._log_back(back)
            return default
        with self._lock:
            self.counters["calls"] += 1
            back = self.health.succeeded(began)
        self._log_back(back)
        return out

    def _log_back(self, back: bool) -> None:
        if back:
            logger.warning("kvsched shared store %s reachable again after %.1f s", redacted(self.url),
                           time.monotonic() - self._down_since)

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

    def update_state(self, key: str, update: Callable[[str | None], str | None], ttl_s: float) -> bool:
        """Read, change and write one state value as one step: `update` gets the value (None: absent) and returns the
        new one (None: delete the key). An optimistic transaction (WATCH, GET, MULTI, SET or DEL, EXEC): if another
        client writes the key in between, nothing is written and `update` runs again on the new value, at most
        UPDATE_ATTEMPTS times (`update` must have no side effects). False if it never went through or the store is
        down. Found by review: a read, then a write, lost the row another replica wrote in between."""
        from redis import WatchError

        ms = _ms(ttl_s)

        def run() -> bool:
            for _ in range(UPDATE_ATTEMPTS):
                with self.client.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(key)
                        value = update(self._text(pipe.get(key)))
                        pipe.multi()
                        if value is None:
                            pipe.delete(key)
                        else:
                            pipe.set(key, value.encode(), px=ms)
                        pipe.execute()
                        return True
                    except WatchError:
                        continue
            with self._lock:
                self.counters["contended_updates"] += 1
            return False

        return self._call(run, False)

    def get_state(self, key: str) -> str | None:
        return self._text(self._call(lambda: self.client.get(key), None))

    def get_states(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        raw = self._call(lambda: list(self.client.mget(list(keys))), [None] * len(keys))
        return [self._text(r) for r in raw]

    def _text(self, raw: Any) -> str | None:
        """A state value as text; a value that is not UTF-8 (another program's, a torn write) is a miss, counted."""
        if raw is None or isinstance(raw, str):
            return raw
        try:
            return bytes(raw).decode()
        except (UnicodeDecodeError, TypeError):
            with self._lock:
                self.counters["bad_values"] += 1
                first = self.counters["bad_values"] == 1
            if first:
                logger.warning("kvsched shared store %s: a state value that is not UTF-8 text, served as absent "
                               "(further ones are counted in store_bad_values, not logged)", redacted(self.url))
            return None

    def delete_state(self, key: str) -> bool:
        return self._call(lambda: bool(self.client.delete(key) or True), False)

    def stats(self) -> dict[str, float]:
        return {"store_up": float(self.health.up), "store_outages": float(self.health.outages),
                "store_failed_calls": float(self.counters["failed_calls"]),
                "store_skipped_calls": float(self.counters["skipped_calls"]),
                "store_error_replies": float(self.counters["error_replies"]),
                "store_bad_values": float(self.counters["bad_values"])}


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
