"""shared_cluster's order of start-ups: where a session's tests/ray start-ups begin (`begins_at`), and a start-up
waiting for a module's tests to be over (`Early.once_over`). No Ray: fake items and modules."""

from __future__ import annotations

from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from tests.ray import shared_cluster
from tests.ray.shared_cluster import Early


def module(name: str, **early: Early) -> ModuleType:
    mod = ModuleType(name)
    if early:
        mod.EARLY = early  # type: ignore[attr-defined]
    return mod


def item(mod: ModuleType | None, nodeid: str) -> Any:
    return SimpleNamespace(module=mod, nodeid=nodeid, fixturenames=())


def test_the_start_ups_begin_at_the_first_test_after_the_integration_packages() -> None:
    unit, integ, ops = module("tests.core.test_a"), module("tests.integration.test_b"), module("tests.ops.test_c")
    ray_units = module("tests.ray.test_units")
    ray_early = module("tests.ray.test_engine", replica=Early(lambda: None, lambda _: None))
    session = [item(unit, "tests/core/test_a.py::t"), item(integ, "tests/integration/test_b.py::t1"),
               item(integ, "tests/integration/test_b.py::t2"), item(ops, "tests/ops/test_c.py::t"),
               item(ray_units, "tests/ray/test_units.py::t"), item(ray_early, "tests/ray/test_engine.py::t")]
    assert shared_cluster.begins_at(session) == "tests/ops/test_c.py::t"
    assert shared_cluster.begins_at(session[:1] + session[3:]) is None  # no tests/integration: its conftest's rule
    assert shared_cluster.begins_at(session[:5]) is None  # no tests/ray start-ups


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module's bookkeeping of its own, the session's left alone (its tests/ray start-ups may be under way)."""
    for name, value in (("_early", {}), ("_after", {}), ("_once_over", {}), ("_ran", []), ("_early_begun", [])):
        monkeypatch.setattr(shared_cluster, name, value)
    monkeypatch.setattr("kvsched.tiny_model.ensure_tiny_model", lambda name: None)


def test_a_start_up_once_over_a_module_begins_at_the_first_test_after_it(fresh: None) -> None:
    begun: list[str] = []
    first, between = module("tests.ray.test_first"), module("tests.ray.test_between")
    waiting = module("tests.ray.test_waiting", app=Early(lambda: begun.append("app") or "app", lambda _: None,
                                                         main_thread=True, once_over="tests.ray.test_first"))
    session = [item(first, "f1"), item(first, "f2"), item(between, "b1"), item(waiting, "w1")]
    shared_cluster.begin_early(session)
    for it in session[:2]:
        shared_cluster.module_begins(it.module)
    assert begun == []  # test_first's tests still run
    shared_cluster.module_begins(between)
    assert begun == ["app"]
    shared_cluster.module_begins(waiting)
    assert shared_cluster.early(waiting, "app") == "app" and begun == ["app"]  # taken, not started twice


def test_a_start_up_taken_before_its_turn_is_not_started_again(fresh: None) -> None:
    begun: list[str] = []
    first = module("tests.ray.test_first")
    waiting = module("tests.ray.test_waiting", app=Early(lambda: begun.append("app") or "app", lambda _: None,
                                                         main_thread=True, once_over="tests.ray.test_first"))
    shared_cluster.begin_early([item(waiting, "w1"), item(first, "f1"), item(module("tests.ray.x"), "x1")])
    shared_cluster.module_begins(waiting)
    assert shared_cluster.early(waiting, "app") == "app" and begun == ["app"]  # started now, by its test
    shared_cluster.module_begins(first)
    shared_cluster.module_begins(module("tests.ray.x"))
    assert begun == ["app"]
