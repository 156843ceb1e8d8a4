"""Store URLs that redis-py reads otherwise than written are refused at the check (start-up, the Ray config), naming
the form to give. Found by review (review68): each passed `check_url`, then
- `?pasword=` (any parameter redis-py has no use for) made every store call raise TypeError, which is neither an
  outage nor an error reply: out of the caller, not a miss;
- `?db=x` or `?socket_timeout=abc` raised ValueError only when the engine opened the store;
- `unix://run/redis.sock` is the socket /redis.sock to redis-py (it reads the path alone);
- `redis://host:6379/cache` is database 0 to redis-py, unsaid."""

from __future__ import annotations

import pytest

pytest.importorskip("redis")

from kvsched.adapters.store.redis_store import RedisStore, StoreConfigError, check_url  # noqa: E402

BAD = {
    "redis://127.0.0.1:1/0?pasword=s3cret": "pasword",
    "redis://127.0.0.1:1/0?db=x": "Invalid value for 'db'",
    "redis://127.0.0.1:1/0?socket_timeout=abc": "Invalid value for 'socket_timeout'",
    "unix://run/redis.sock": "unix:///PATH",
    "redis://127.0.0.1:6379/cache": "its path names the database",
}


@pytest.mark.parametrize("url", BAD)
def test_a_url_redis_py_reads_otherwise_is_refused_at_the_check(url: str) -> None:
    with pytest.raises(StoreConfigError, match=BAD[url]) as err:
        check_url(url)
    assert "s3cret" not in str(err.value)


def test_a_typo_parameter_no_longer_reaches_a_store_call() -> None:
    with pytest.raises(StoreConfigError, match="pasword"):
        RedisStore("redis://127.0.0.1:1/0?pasword=x")  # on main: built, then ping() raised TypeError


@pytest.mark.parametrize("url", ["redis://h:6379", "redis://h:6379/", "redis://h:6379/3", "REDIS://h:6379/0",
                                 "rediss://:pw@h:6380/0?ssl_cert_reqs=none&ssl_password=k",
                                 "unix:///run/redis.sock?db=2", "unix://localhost/run/redis.sock",
                                 "redis://h/0?socket_timeout=0.5&health_check_interval=2&max_connections=8"])
def test_the_forms_redis_py_takes_pass(url: str) -> None:
    assert check_url(url) == url
