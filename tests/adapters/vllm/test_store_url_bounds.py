"""A store URL cannot lengthen the store's own bounds (0.5 s a call, 0.25 s a connect; redis_store's docstring).
redis-py lets the URL's query win over the client's arguments, so `?socket_timeout=600` made one call to a hung store
stall an engine's step for 600 s: found by leftovers71. Refused at the check, naming the parameter, its value and the
bound, for redis://, rediss:// and unix:// alike; `?retry=` (text where redis-py calls an object) too. The parameters
that keep a call within the bound stay allowed, and a real redis-server that stops answering (SIGSTOP) fails a call
made with all of them within the bound."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("redis")

from kvsched.adapters.store.redis_store import (  # noqa: E402
    CONNECT_TIMEOUT_S,
    SOCKET_TIMEOUT_S,
    RedisStore,
    StoreConfigError,
    check_url,
)

BASES = ["redis://:s3cret@127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "unix:///run/redis.sock"]
# what a URL may set and still keep a call within the bound (redis_store's docstring says why each one does)
WITHIN = "socket_timeout=0.5&socket_connect_timeout=0.25&retry_on_timeout=true&retry_on_error=TimeoutError" \
         "&health_check_interval=1&socket_keepalive=true&max_connections=4"


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(("query", "said"), [
    ("socket_timeout=600", f"socket_timeout=600 s is above the store's bound of {SOCKET_TIMEOUT_S:g} s"),
    ("socket_timeout=0.51", f"socket_timeout=0.51 s is above the store's bound of {SOCKET_TIMEOUT_S:g} s"),
    ("socket_connect_timeout=600", f"socket_connect_timeout=600 s is above the store's bound of {CONNECT_TIMEOUT_S:g}"),
    ("socket_timeout=0.1&socket_connect_timeout=1", "socket_connect_timeout=1 s is above"),
    ("retry=3", "retry: redis-py takes it as an object.*no retries of its own"),
    ("credential_provider=x", "credential_provider: redis-py takes it as an object"),
    ("cache_config=x", "cache_config: redis-py takes it as an object"),  # on main: AttributeError out of check_url
])
def test_a_url_asking_beyond_the_bound_is_refused_naming_parameter_value_and_bound(base: str, query: str,
                                                                                   said: str) -> None:
    with pytest.raises(StoreConfigError, match=said) as err:
        check_url(f"{base}?{query}")
    assert "s3cret" not in str(err.value) and base.split("@")[-1].split("?")[0] in str(err.value), str(err.value)


@pytest.mark.parametrize("base", BASES)
def test_what_keeps_a_call_within_the_bound_passes(base: str) -> None:
    query = WITHIN.replace("&socket_keepalive=true", "") if base.startswith("unix") else WITHIN  # (TCP's only)
    assert check_url(f"{base}?{query}") == f"{base}?{query}"


def test_a_url_cannot_make_the_store_retry(redis_server) -> None:
    store = RedisStore(f"{redis_server.url}?{WITHIN}")
    connection = store.client.connection_pool.make_connection()
    assert connection.retry.get_retries() == 0 and connection.socket_timeout == SOCKET_TIMEOUT_S


def test_a_stopped_server_fails_a_call_within_the_bound_though_the_url_asked_for_600_s(redis_server) -> None:
    with pytest.raises(StoreConfigError, match="socket_timeout=600 s is above"):
        RedisStore(f"{redis_server.url}?socket_timeout=600")  # on main: opened, and the call below waited 600 s
    store = RedisStore(f"{redis_server.url}?{WITHIN}")
    assert store.put_blocks({"k": b"v"}, 60) and store.get_blocks(["k"]) == [b"v"]
    time.sleep(1.1)  # past health_check_interval: the call below sends its PING first
    got: list[object] = []
    call = threading.Thread(target=lambda: got.append(store.get_blocks(["k"])), daemon=True)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        call.start()
        call.join(SOCKET_TIMEOUT_S * 2 + 1.0)  # the bound, a PING's and the call's, and scheduling slack
        waited = time.monotonic() - began
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    assert not call.is_alive(), f"a store call still waiting after {waited:.1f} s"
    assert got == [[None]] and store.counters["failed_calls"] == 1 and not store.up
