"""Implementations under test: the C++ ones skip when kvsched._C is not built, except under `make test`
(KVSCHED_REQUIRE_EXT=1 builds it first), where a missing extension is a failure."""

from __future__ import annotations

import importlib.util
import os

import pytest

from kvsched.ops import backends
from tests.ops import triton_run


def require_cxx() -> None:
    if backends.has_cxx():
        return
    if os.environ.get("KVSCHED_REQUIRE_EXT"):
        pytest.fail("kvsched._C is not built (make ext) but KVSCHED_REQUIRE_EXT is set")
    pytest.skip("kvsched._C not built")


@pytest.fixture(params=["torch", "cxx"])
def impl(request: pytest.FixtureRequest) -> str:
    if request.param == "cxx":
        require_cxx()
    return str(request.param)


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: started only when its test is to run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if importlib.util.find_spec("triton") and any(item.nodeid.endswith(triton_run.TEST_NAME) for item in items):
        triton_run.checks_run()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    triton_run.stop()
