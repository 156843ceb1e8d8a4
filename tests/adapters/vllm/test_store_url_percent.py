"""Store URLs' percent-encoded parts as redis-py 8 reads them (`redis.connection.parse_url`: the path, user, password
and a unix socket's path percent-decoded, query values decoded once): kvsched's check (redis_store.check_url) takes
what redis-py takes and means, and refuses a database redis-py would read otherwise than the URL reads. Found by
leftovers70: `redis://host/%31` (database 1 to redis-py) was refused, `redis://host/²` (str.isdigit, but database 0
to redis-py) taken, and `?db=-1` taken (Redis refuses the SELECT at every connect)."""

from __future__ import annotations

import pytest

pytest.importorskip("redis")

from redis.connection import parse_url  # noqa: E402

from kvsched.adapters.store.redis_store import StoreConfigError, check_url  # noqa: E402

TAKEN = {  # URL -> what redis-py connects with
    "redis://cache.internal/%31": {"db": 1},
    "redis://cache.internal:6379/%31%32/": {"db": 12},
    "redis://cache.internal/%2F3": {"db": 3},
    "redis://cache.internal/?db=%31": {"db": 1},
    "redis://cache.internal/4?db=%34": {"db": 4},
    "redis://ops%40team:p%40ss%2Fw0rd@cache.internal/0": {"username": "ops@team", "password": "p@ss/w0rd", "db": 0},
    "rediss://:%3Ahidden%23@cache.internal:6380/2": {"password": ":hidden#", "db": 2},
    "unix:///run/redis%20main.sock?db=%35": {"path": "/run/redis main.sock", "db": 5},
    "unix://localhost/run/redis.sock": {"path": "/run/redis.sock"},
}
REFUSED = {  # URL -> what the refusal says
    "redis://cache.internal/\u00b2": "would read database 0",  # str.isdigit passed it; int() does not
    "redis://cache.internal/%C2%B2": "would read database 0",
    "redis://cache.internal/1/2": "would read database 12",
    "redis://cache.internal/+1": "would read database 1",
    "redis://cache.internal/%2D1": "would read database -1",
    "redis://cache.internal/db1": "would read database 0",
    "redis://cache.internal/1?db=2": "names database 1 in its path and 2 in ?db=",
    "redis://cache.internal/%31?db=%32": "names database 1 in its path and 2 in ?db=",
    "redis://cache.internal/?db=-1": "db must be a database number >= 0",
    "redis://cache.internal/?db=%C2%B2": "Invalid value for 'db'",
    "redis://cache.internal/1?db=%C2%B2": "Invalid value for 'db'",  # was int()'s ValueError (found by review71)
}


@pytest.mark.parametrize("url", TAKEN)
def test_percent_encoded_parts_redis_py_decodes_are_taken_with_its_meaning(url: str) -> None:
    assert check_url(url) == url
    read = parse_url(url)
    assert {k: read.get(k) for k in TAKEN[url]} == TAKEN[url]


@pytest.mark.parametrize("url", REFUSED)
def test_a_database_redis_py_would_read_otherwise_is_refused_saying_how(url: str) -> None:
    with pytest.raises(StoreConfigError, match="shared store URL") as err:
        check_url(url)
    assert REFUSED[url] in str(err.value)
