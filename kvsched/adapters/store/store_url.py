"""The shared store's URL: what kvsched accepts (`check_url`, at start-up: the engine's `--kvsched-store-url`,
`KVSCHED_STORE_URL`, the Ray config's `store.url`) and how it is quoted (`redacted`: never a password). Split from
redis_store (the client and its guard) by job.

The URL cannot lengthen the store's bounds (SOCKET_TIMEOUT_S, CONNECT_TIMEOUT_S): redis-py lets a URL's query win over
the client's arguments, so `?socket_timeout=600` would make one hung store call stall the engine's step (the
scheduler's or the tier worker's) for 600 s. A `?socket_timeout=` above SOCKET_TIMEOUT_S or a
`?socket_connect_timeout=` above CONNECT_TIMEOUT_S is refused at start-up (StoreConfigError naming the parameter, its
value and the bound), never clamped in silence; a shorter one is used. `?retry=` (and the other parameters redis-py
wants as objects, which a URL can only give as text) is refused too. What a URL may set and still keeps a call within
the bound (measured against a SIGSTOPped redis-server, redis-py 8.2): `?retry_on_timeout=` and `?retry_on_error=`
(they add errors to the client's Retry, whose retries stay 0), `?health_check_interval=` (a PING before a call,
bounded by the same timeout, and the call fails if it does not answer), `?socket_keepalive=` (TCP probes of an idle
socket), `?max_connections=` (redis-py's plain pool raises when it is exhausted, it never waits). The same holds for
unix:// and rediss:// URLs (one parse for all three).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from kvsched.core.env import env_setting

SOCKET_TIMEOUT_S = 0.5  # the store's bound on one call's socket read or write (redis_store: the client's timeout)
CONNECT_TIMEOUT_S = 0.25  # and on one connect
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
    number = given[0].strip().lstrip("+") if given else ""  # (`²` is no number: redis-py's reading refuses it)
    if name and number.isascii() and number.isdigit() and int(number) != int(name):
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
                               f"VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY=KVSCHED_, which `vllm serve --scheduler "
                               f"kvsched` sets on a Ray backend)")
    return real
