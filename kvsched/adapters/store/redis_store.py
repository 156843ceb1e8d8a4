"""kvsched's shared level on Redis (`kvsched.core.shared_state.SharedStore`): block payloads and session state, with
TTLs, behind one guard that keeps a store outage from costing requests anything.

Every call goes through `StoreHealth`: while the store is down, calls are skipped (a get is a miss, a put is dropped)
until the next reconnect attempt is due (exponential backoff up to 30 s); the outage is logged once when it starts and
once when the store is back. Timeouts are short (a loopback or same-rack Redis answers in well under a millisecond),
so a hung store costs one timeout per backoff period, not one per request. redis-py's own retries are off: the
backoff is ours.

The URL cannot lengthen those bounds: redis-py lets a URL's query win over the client's arguments, so
`?socket_timeout=600` would make one hung store call stall the engine's step (the scheduler's or the tier worker's)
for 600 s. A `?socket_timeout=` above SOCKET_TIMEOUT_S or a `?socket_connect_timeout=` above CONNECT_TIMEOUT_S is
refused at start-up (StoreConfigError naming the parameter, its value and the bound), never clamped in silence; a
shorter one is used. `?retry=` (and the other parameters redis-py wants as objects, which a URL can only give as text)
is refused too. What a URL may set and still keeps a call within the bound (measured against a SIGSTOPped
redis-server, redis-py 8.2): `?retry_on_timeout=` and `?retry_on_error=` (they add errors to the client's Retry, whose
retries stay 0), `?health_check_interval=` (a PING before a call, bounded by the same timeout, and the call fails if
it does not answer), `?socket_keepalive=` (TCP probes of an idle socket), `?max_connections=` (redis-py's plain pool
raises when it is exhausted, it never waits). The same holds for unix:// and rediss:// URLs (one parse for all three).

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
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from kvsched.core.env import env_setting
from kvsched.core.shared_state import MAX_TTL_S
from kvsched.core.store_health import StoreHealth

logger = logging.getLogger("vllm.kvsched.store")
T = TypeVar("T")
SOCKET_TIMEOUT_S = 0.5
CONNECT_TIMEOUT_S = 0.25
UPDATE_ATTEMPTS = 16  # tries of one `update_state` while other clients write the same key
SECRET = "***"  # what a password becomes in a redacted URL
# redis-py passes every query parameter to its connection: `?password=` is the password, `?ssl_password=` the TLS
# private key's (redis-py's own repr hides both: ConnectionPool.SENSITIVE_REPR_KEYS; found by review: the second was
# logged and written to a benchmark's JSON as given)
SECRET_PARAMS = frozenset({"password", "ssl_password"})
# redis-py parameters that must be objects (a Retry, a callable, a provider, ...): from a URL they are text, and every
# call raises (AttributeError / TypeError, neither an outage nor an error reply), or the pool raises as it is made
OBJECT_PARAMS = frozenset({"retry", "redis_connect_func", "credential_provider", "command_packer", "event_dispatcher",
                           "socket_keepalive_options", "socket_type", "cache", "cache_config", "cache_factory",
                           "maint_notifications_config", "oss_cluster_maint_notifications_handler", "parser_class",
                           "connection_class", "driver_info"})


class StoreConfigError(ValueError):
    """A store URL kvsched cannot use (the message names it)."""


def check_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here, at start-up, not at the first call
    except ValueError as exc:
        raise StoreConfigError(f"the shared store URL {redacted(url)!r} is malformed ({exc})") from None
    located = parts.path if parts.scheme == "unix" else parts.hostname
    if not str(url).lower().startswith(("redis://", "rediss://", "unix://")) or not located:
        # (a redis:// URL names a host: `redis:user:pw@host:6379`, no `//`, is a path to urlsplit and passed here,
        # to fail only at redis-py's first connection, with no StoreConfigError. Found by review. And redis-py refuses
        # a URL without the `//` of its scheme, `unix:/run/redis.sock` too, as the engine opens the store: found by
        # review, that one passed the Ray config's and the engine's start-up checks)
        raise StoreConfigError(f"the shared store must be a redis://HOST:PORT[/DB], rediss://HOST:PORT[/DB] or "
                               f"unix:///PATH URL, got {redacted(url)!r}")
    if parts.scheme == "unix" and parts.hostname not in (None, "localhost"):
        # (redis-py reads the path alone: `unix://run/redis.sock` is the socket /redis.sock. Found by review)
        raise StoreConfigError(f"the shared store URL {redacted(url)!r} names the socket {parts.path!r}, not "
                               f"{parts.hostname + parts.path!r}: a unix socket's URL is unix:///PATH")
    if parts.scheme != "unix":
        _check_database(url, parts)
    _redis_reads(url)
    return url


def _check_database(url: str, parts: SplitResult) -> None:
    """The URL's path names the database as redis-py reads it (`parse_url`: the path percent-decoded, its slashes
    dropped, then int()): ASCII digits, percent-encoded or not (`/%31` is database 1). Refused: a path that is no
    number, which redis-py reads as database 0, unsaid (found by review), and int()'s other readings (`/²`, which
    str.isdigit passed, read as database 0; `/1/2` read as 12; `/+1`, `/1_0`), and a path naming another database
    than `?db=`, which redis-py takes instead, ignoring the path (found by leftovers70: `/%31` was refused)."""
    name = unquote(parts.path).strip("/")
    if name and not (name.isascii() and name.isdigit()):
        try:
            read = f"database {int(unquote(parts.path).replace('/', ''))}"
        except ValueError:
            read = "database 0, the default"
        raise StoreConfigError(f"the shared store URL {redacted(url)!r}: its path names the database, a number "
                               f"(redis://HOST:PORT/0), got {parts.path[:64]!r} (redis-py would read {read})")
    given = [v for k, v in parse_qsl(parts.query) if k == "db"][:1]  # redis-py's parse_qs: the first non-empty one
    if name and given and given[0].strip().lstrip("+").isdigit() and int(given[0]) != int(name):
        raise StoreConfigError(f"the shared store URL {redacted(url)!r} names database {int(name)} in its path and "
                               f"{int(given[0])} in ?db=, which redis-py takes (it ignores the path): give one")


def _redis_reads(url: str) -> None:
    """redis-py's own reading of `url`: its parse and the connection it would make, no I/O. Found by review: a query
    parameter redis-py has no use for (a typo, `?pasword=`) passed the check, then every store call raised TypeError,
    neither an outage nor an error reply, out of the engine's call; a bad `?db=` or `?socket_timeout=` raised
    ValueError only when the engine opened the store."""
    try:
        import redis
    except ImportError:  # the engine's store needs it; a driver checking a config may not have it
        return
    try:
        why = (_objects([k for k, _ in parse_qsl(urlsplit(url).query)])
               or _unusable(redis.ConnectionPool.from_url(url).make_connection())
               or _beyond_bounds(redis.connection.parse_url(url)))
    except (TypeError, ValueError, AttributeError, redis.RedisError) as exc:  # (`?cache_config=x`: AttributeError)
        why = str(exc)
    if why is not None:  # every query value hidden: a misspelt ?password= holds the password
        base, _, query = url.partition("?")  # (not urlunsplit, which writes unix:///PATH as unix:/PATH)
        hidden = urlencode([(k, SECRET) for k, _ in parse_qsl(query, keep_blank_values=True)], safe="*")
        raise StoreConfigError(f"the shared store URL {redacted(base) + '?' + hidden!r} is not one "
                               f"kvsched's store can use ({why})") from None


def _beyond_bounds(options: Mapping[str, Any]) -> str | None:
    """Why redis-py's reading of a URL (`options`, its `parse_url`) would make a store call wait beyond the store's
    own bounds, or None. Found by leftovers71: the URL's query wins over the client's arguments, so
    `?socket_timeout=600` made a call to a hung store wait 600 s on the engine's step."""
    for name, bound in (("socket_timeout", SOCKET_TIMEOUT_S), ("socket_connect_timeout", CONNECT_TIMEOUT_S)):
        seconds = options.get(name)
        if isinstance(seconds, float) and seconds > bound:
            return (f"{name}={seconds:g} s is above the store's bound of {bound:g} s: the store's calls are on the "
                    f"engine's latency path, so a hung store would stall an engine's step that long; give at most "
                    f"{bound:g} or leave it out")
    return None


def _objects(names: Sequence[str]) -> str | None:
    """Why the query's parameters `names` cannot be given in a URL, or None: OBJECT_PARAMS. Found by leftovers71:
    `?retry=3` passed the check, then every store call raised AttributeError (redis-py called the text as its Retry
    object); `?credential_provider=x` likewise, or DataError out of the check itself with a password."""
    objects = sorted(OBJECT_PARAMS.intersection(names))
    if objects:
        why = "; the store makes no retries of its own: its backoff is StoreHealth's" if objects[0] == "retry" else ""
        return (f"{objects[0]}: redis-py takes it as an object, which a URL can only give as text (every store call "
                f"would raise){why}")
    return None


def _unusable(connection: Any) -> str | None:
    """Why a connection redis-py made from the URL's parameters cannot serve kvsched's store, or None. Found by review
    (review69): `?decode_responses=true` made every read of a KV block raise UnicodeDecodeError, `?encoding=` of no
    codec LookupError and `?socket_timeout=-1` ValueError, out of the engine's store call (neither an outage nor an
    error reply); `?socket_timeout=0` (a non-blocking socket) made every call an outage."""
    import codecs

    if connection.encoder.decode_responses:
        return "decode_responses: the store holds KV blocks as bytes, which redis-py would decode as text; leave it out"
    try:
        codecs.lookup(connection.encoder.encoding)
    except LookupError:
        return "encoding: no such codec"
    if isinstance(connection.db, int) and connection.db < 0:  # (?db=-1: Redis refuses the SELECT at each connect)
        return "db must be a database number >= 0"
    for name in ("socket_timeout", "socket_connect_timeout"):
        seconds = getattr(connection, name, None)
        if seconds is not None and not 0 < seconds < float("inf"):
            return f"{name} must be a number of seconds > 0"
    return None


def redacted(url: str) -> str:
    """`url` fit for a log line or an error message: the password (`user:PASSWORD@`, `?password=`) is `***`. Total:
    never raises, whatever `url` is."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<malformed store URL>"
    if "@" in str(url) and "@" not in parts.netloc:  # `user:secret@host:6379`, no `//`: a scheme and a path to
        return "<store URL without //HOST: hidden>"  # urlsplit, its password nowhere to cut out (found by review)
    user, at, host = parts.netloc.rpartition("@")
    netloc = f"{user.partition(':')[0]}:{SECRET}@{host}" if at and ":" in user else parts.netloc
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() in SECRET_PARAMS for k, _ in pairs):
        query = urlencode([(k, SECRET if k.lower() in SECRET_PARAMS else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return str(url)
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def has_secret(url: str) -> bool:
    """True if `url` carries a password (`redacted` changes it)."""
    return redacted(url) != url


def is_redacted(url: str) -> bool:
    """True if `url` is a `redacted` form (its password replaced by `***`): a marker, not a URL to connect to."""
    try:
        parts = urlsplit(str(url))
        return parts.password == SECRET or any(k.lower() in SECRET_PARAMS and v == SECRET
                                               for k, v in parse_qsl(parts.query, keep_blank_values=True))
    except ValueError:
        return False


def unredacted(url: str, env: str) -> str:
    """`url`, or if it is a `redacted` marker the URL it stands for: the value of the environment variable `env`, which
    must redact to exactly `url` (StoreConfigError says what is wrong, never the password)."""
    if not is_redacted(url):
        return url
    import os

    real = env_setting(os.environ, env) or ""
    if redacted(real) != url:
        raise StoreConfigError(f"{url!r} stands for a store URL with a password, which the engine takes from {env}; "
                               f"{env} {'names another store' if real else 'is not set'} in this process (a Ray "
                               f"worker on another node gets KVSCHED_* only through "
                               f"VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY=KVSCHED_, which `vllm serve --scheduler kvsched` "
                               f"sets on a Ray backend)")
    return real


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
