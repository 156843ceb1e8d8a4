"""Implementations under test: the C++ ones skip when kvsched._C is not built, except under `make test`
(KVSCHED_REQUIRE_EXT=1 builds it first), where a missing extension is a failure."""

from __future__ import annotations

import os

import pytest

from kvsched.ops import backends


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
