"""early.py's later start-ups (`spawn_later`), with stand-ins for `vllm serve`: test_fp8_tier's servers spawn once the
first wave is over and not before, test_plan_vllm's at the first test after test_fp8_tier's, and a fixture that
started its own servers first (`take` found nothing) gets no second copy spawned behind it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration import early

FP8 = "tests/integration/test_fp8_tier.py::"
PLAN = "tests/integration/test_plan_vllm.py::"
IDS = ["tests/core/test_a.py::t", FP8 + "a", FP8 + "b", "tests/integration/test_fuzz.py::f", PLAN + "p"]


class Item:
    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.fixturenames = ["launched"]


class Server:
    def __init__(self, spec: Any) -> None:
        self.spec, self.proc = spec, None

    def launch(self) -> Server:
        self.proc = object()
        return self

    def stop(self) -> None:
        pass


class Done:
    procs: list[Any] = []


@pytest.fixture
def wave(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, bool]:
    """early's state as `spawn` leaves it for IDS (the first wave's start-ups stood in), and a switch for whether
    that wave is over."""
    import kvsched.serving
    import tests.integration.servers as servers

    monkeypatch.setattr(kvsched.serving, "VllmServer", Server)
    monkeypatch.setattr(servers, "fp8_tier_specs", lambda model: {"tier": "t", "faulty": "f", "tp": "p"})
    monkeypatch.setattr(servers, "plan_specs", lambda model, out: ({"config-only": "c"}, "fp8"))
    over = {"now": False}
    monkeypatch.setattr(early, "first_wave_over", lambda: over["now"])
    monkeypatch.setattr(early, "WAVE_CHECK_S", 0.0)
    monkeypatch.setattr(early, "SPAWNED", {})
    monkeypatch.setattr(early, "_wave", {"first": ([], Done())})
    early.plan_later(tmp_path, [Item(n) for n in IDS])
    return over


def test_the_fp8_tier_servers_spawn_once_the_first_wave_is_over(wave: dict[str, bool]) -> None:
    early.spawn_later(IDS[0])
    assert early.FP8_TIER not in early.SPAWNED  # the first wave still starting: not beside it
    wave["now"] = True
    early.spawn_later(IDS[0])
    assert sorted(early.SPAWNED[early.FP8_TIER]) == ["faulty", "tier", "tp"]
    first = early.SPAWNED[early.FP8_TIER]
    early.spawn_later(IDS[0])
    assert early.SPAWNED[early.FP8_TIER] is first  # once
    assert early.take(early.FP8_TIER) is first and early.take(early.FP8_TIER) is None


def test_a_fixture_that_started_its_own_gets_no_second_copy(wave: dict[str, bool]) -> None:
    assert early.take(early.FP8_TIER) is None  # the module's set-up came first: it launches its own
    wave["now"] = True
    early.spawn_later(IDS[1])
    assert early.FP8_TIER not in early.SPAWNED


def test_the_plan_engine_spawns_at_the_first_test_after_the_fp8_tier_modules(wave: dict[str, bool]) -> None:
    for nodeid in IDS[:3]:
        early.spawn_later(nodeid)
        assert early.PLAN not in early.SPAWNED
    early.spawn_later(IDS[3])
    assert list(early.SPAWNED[early.PLAN]) == ["config-only"]
    assert early.take(early.PLAN) is not None
    early.spawn_later(IDS[3])
    assert early.PLAN not in early.SPAWNED


def test_a_module_whose_servers_were_not_spawned_starts_its_own_and_stops_them(
        wave: dict[str, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest.started_early, nothing spawned under the key: each launched, waited for, and stopped at the end."""
    from tests.integration.conftest import started_early

    events: list[str] = []

    class Ready(Server):
        def launch(self) -> Ready:
            events.append(f"launch {self.spec}")
            return super().launch()  # type: ignore[return-value]

        def wait_ready(self) -> Ready:
            events.append(f"ready {self.spec}")
            return self

        def stop(self) -> None:
            events.append(f"stop {self.spec}")

    import kvsched.serving

    monkeypatch.setattr(kvsched.serving, "VllmServer", Ready)
    with started_early(early.FP8_TIER, {"a": "x", "b": "y"}) as named:
        assert sorted(named) == ["a", "b"] and events == ["launch x", "launch y", "ready x", "ready y"]
    assert events[4:] == ["stop x", "stop y"]
    wave["now"] = True
    early.spawn_later(IDS[1])
    assert early.FP8_TIER not in early.SPAWNED  # taken (nothing): no copy spawned behind it
