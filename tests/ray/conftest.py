"""tests/ray's shared Ray cluster and early start-ups (shared_cluster.py): the fixture and the hooks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.ray import shared_cluster

APP_FIRST = "tests.ray.test_serve_integration"  # its app, deployed early at "/", runs before the others take "/"


@pytest.fixture(scope="package")
def serve_cluster() -> Iterator[dict[str, Any]]:
    """The package's Ray cluster (`shared_cluster.start_cluster`), shut down after the package's last test."""
    try:
        yield shared_cluster.start_cluster()
    finally:
        shared_cluster.stop_cluster()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`APP_FIRST`'s tests before those of the other modules deploying an app (all at "/", one at a time)."""
    first = [i for i in items if getattr(getattr(i, "module", None), "__name__", "") == APP_FIRST]
    rest = [i for i in items if getattr(getattr(i, "module", None), "__name__", "") != APP_FIRST]
    at = next((n for n, i in enumerate(rest) if "serve_cluster" in getattr(i, "fixturenames", ())), None)
    if first and at is not None:
        items[:] = rest[:at] + first + rest[at:]


def pytest_runtest_setup(item: pytest.Item) -> None:
    """The first test of a module with start-ups (`EARLY`): those of all the session's tests/ray modules begin, unless
    they began after tests/integration's tests (tests/conftest.py `RAY_AT`); each test's module: the start-ups waiting
    for the modules before it (`Early.once_over`) begin."""
    if getattr(getattr(item, "module", None), "EARLY", None):
        shared_cluster.begin_early(item.session.items)
    shared_cluster.module_begins(getattr(item, "module", None))


def pytest_sessionfinish(session: pytest.Session) -> None:
    shared_cluster.stop_untaken()
    shared_cluster.stop_cluster()
