"""Shared fixtures: a fake clock for the policy core, the tiny model for everything that needs vLLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _kvsched_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("KVSCHED_")}


@pytest.fixture(autouse=True)
def _no_leaked_kvsched_setting():
    """A test that leaves a KVSCHED_* variable behind changes every server later tests start (they inherit this
    process's environment): fail it, and put the environment back."""
    before = _kvsched_env()
    yield
    after = _kvsched_env()
    if after != before:
        for k in after.keys() - before.keys():
            del os.environ[k]
        os.environ.update(before)
        pytest.fail(f"the test left KVSCHED_* settings changed: {sorted(set(after.items()) ^ set(before.items()))}")


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests taking a run started ahead after the other tests of their directory (tests/ahead.py); test_demo's
    test last: its demo runs beside the session's last, mostly waiting tests (integration/early.py)."""
    from tests import ahead
    from tests.integration import early

    ahead.takers_last(items)
    early.demo_last(items)


DEMO_AT: list[str | None] = [None]  # the node id of the test whose start starts the demo (early.demo_starts_at)
RAY_AT: list[str | None] = [None]  # the node id of the test whose set-up begins tests/ray's start-ups (its conftest)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A session that runs tests/integration spawns that package's shared servers and failing start-ups now, while
    the tests collected before it keep one core busy, its demo later (early.demo_starts_at, integration/early.py);
    the unit tests' sub-processes (`AHEAD`, tests/ahead.py) start now too."""
    from tests import ahead
    from tests.integration import early
    from tests.ray import shared_cluster

    if not session.config.option.collectonly:
        RAY_AT[0] = shared_cluster.begins_at(session.items)
        ahead.begin(session.items)
    if early.wanted(session.items) and not session.config.option.collectonly:
        from kvsched.tiny_model import ensure_tiny_model

        DEMO_AT[0] = early.demo_starts_at(session.items)
        early.spawn(ensure_tiny_model("test"), session.items)


def pytest_runtest_logstart(nodeid: str, location: tuple[str, int | None, str]) -> None:
    """Each test's start (before its setup, so also when a mark skips it): `DEMO_AT`'s starts the demo; the
    integration package's second wave of start-ups begins at the first after its first is over (early.spawn_later)."""
    from tests.integration import early

    if DEMO_AT[0] is not None and nodeid == DEMO_AT[0]:
        early.spawn_demo()
    early.spawn_later(nodeid)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`RAY_AT`'s set-up begins tests/ray's cluster and early start-ups (shared_cluster.begins_at), after the
    integration package's tests, not at tests/ray's first module with start-ups (its conftest, a session without
    tests/integration)."""
    if RAY_AT[0] is not None and item.nodeid == RAY_AT[0]:
        from tests.ray import shared_cluster

        shared_cluster.begin_early(item.session.items)


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests import ahead
    from tests.integration import early

    early.stop_untaken()
    ahead.stop_untaken()


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    from kvsched.tiny_model import ensure_tiny_model

    return ensure_tiny_model("test")


@pytest.fixture
def redis_server():
    """A real redis-server on a random loopback port (apt package redis-server; `make test` installs it)."""
    from kvsched.adapters.store.local_redis import LocalRedis, RedisUnavailable

    try:
        server = LocalRedis()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    with server as s:
        yield s
