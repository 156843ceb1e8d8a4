"""Store URLs as redis-py reads them (kvsched.adapters.store.redis_store): redis-py hands every query parameter to its
connection, so `?ssl_password=` (the TLS private key's password, which redis-py's own repr hides) is a secret as
`?password=` is, and it refuses a URL without its scheme's `//` (`unix:/run/redis.sock`) when the engine opens the
store, so the start-up checks refuse it first. Both found by review."""

from __future__ import annotations

import pytest

pytest.importorskip("redis")

from kvsched.adapters.store.redis_store import StoreConfigError, check_url, has_secret, redacted  # noqa: E402

TLS = "rediss://cache.internal:6380/0?ssl_keyfile=/etc/k.pem&ssl_password=KEYSECRET&ssl_certfile=/etc/c.pem"


def test_the_tls_key_password_is_hidden_in_logs_errors_and_benchmark_results() -> None:
    from kvsched.bench.engine_settings import set_settings

    assert "KEYSECRET" not in redacted(TLS) and "ssl_password=***" in redacted(TLS) and has_secret(TLS)
    assert "KEYSECRET" not in set_settings({"KVSCHED_STORE_URL": TLS})["KVSCHED_STORE_URL"]
    with pytest.raises(StoreConfigError) as err:
        check_url(TLS.replace(":6380", ":port"))
    assert "KEYSECRET" not in str(err.value)


@pytest.mark.parametrize("url", ["unix:/run/redis.sock", "redis:cache.internal:6379", "rediss:/cache.internal"])
def test_a_url_without_its_schemes_slashes_is_refused_at_the_check_as_redis_py_refuses_it(url: str) -> None:
    import redis

    with pytest.raises(ValueError, match="must specify one of the following schemes"):
        redis.Redis.from_url(url)  # what the engine would meet when it opens the store
    with pytest.raises(StoreConfigError, match="redis://HOST:PORT"):
        check_url(url)


def test_the_ray_config_refuses_it_before_any_replica_starts() -> None:
    from pydantic import ValidationError

    from kvsched.adapters.ray.config import StoreSettings

    with pytest.raises(ValidationError, match="redis://HOST:PORT"):
        StoreSettings(url="unix:/run/redis.sock")
    assert StoreSettings(url="unix:///run/redis.sock").url == "unix:///run/redis.sock"
