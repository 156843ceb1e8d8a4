"""The integration package's shared servers (`servers.package_specs`) and its `vllm serve` start-ups that must fail
(`servers.failing_starts`), spawned when a session that will run them starts (tests/conftest.py), not when its first
integration test does: the unit tests collected before tests/integration run in one process and mostly keep one core
busy, so these start-ups (~30 CPU-seconds per server, ~15 per failing start, single-threaded imports) take the other
core meanwhile. The package's fixtures (conftest.launched, conftest.failed_starts) take them over; a session that
never gets there stops them when it ends.
test_demo's `kvsched demo` (`demo_argv`; test_demo.demo_run takes it): two `vllm serve` start-ups and 10 turns a side
paced by ~2 s tool calls, a phase of ~1 busy core (57 s, 0.8 cores busy on average). Its test runs last (`demo_last`)
and the demo starts at `DEMO_WITH`'s first test (`demo_starts_at`): from there to the session's end (tests/ray's last
Serve modules, waiting on scrape deadlines, then tests/sim and the top-level tests) ~75 s ran at ~1 busy core (suite67's
sampler, Xeon model 167). Beside the unit tests at the session's start (suite66) it took CPU those tests and the
start-ups above needed. A session without that module starts it at the first test after tests/integration and
tests/ray (`BUSY_PACKAGES`), or with the start-ups when no test comes after them.
A second wave (`LATER`: test_fp8_tier's three servers, servers.fp8_tier_specs) is spawned once the first is over (its
servers answer /health, its failing start-ups have exited: `first_wave_over`, checked at a test's start every
`WAVE_CHECK_S`), not beside it nor in front of its module: where its set-up waited 43 s for them (helper suite68), they
start while the unit phase's last tests, whose first-wave start-ups are done, leave a core idle, and the first
integration modules run. The wave's memory is that of the module's servers beside the package's, as when it runs.
test_plan_vllm's own engine (`PLAN`, servers.plan_specs) is spawned at the first test after test_fp8_tier's (their
memory back), its start-up beside the light modules between, where it kept that module's set-up waiting 18-24 s.
Every start-up spawned here runs in the background (tests/background.py: a lower CPU priority) until a fixture takes
it (`take`): it takes what the tests running meanwhile leave idle, not a share of their cores; the demo's `vllm serve`
children, each in a session of its own, too (`background.Tree`)."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests import background

SPAWNED: dict[str, Any] = {}  # "servers" and `FP8_TIER`: name -> VllmServer (launched), "failing": procs.Started,
# "recording": Path, "demo": (procs.Started, its result file)
DEMO_FIXTURE = "demo_run"
BUSY_PACKAGES = ("tests/integration/", "tests/ray/")  # their tests run servers and clusters: both cores busy
DEMO_WITH = "tests/ray/test_hostile_ingress.py"  # the demo starts with it, in the background (tests/background.py:
# the deadline tests after it keep their cores): the first module after test_serve_integration, from where ~1 core
# idled until test_serve_admin_routes (suite70's sampler: 0.9-1.3 busy cores over ~60 s)
FP8_TIER = "fp8_tier"  # SPAWNED's key of test_fp8_tier's servers (its `servers` fixture takes them)
PLAN = "plan"  # test_plan_vllm's engine (its `engines` fixture takes it), spawned at the first test after FP8_TIER's
LATER = {FP8_TIER: "tests/integration/test_fp8_tier.py::", PLAN: "tests/integration/test_plan_vllm.py::"}  # key ->
# the node ids that use it
WAVE_CHECK_S = 2.0
_wave: dict[str, Any] = {}  # "due": the `LATER` keys not spawned yet nor taken, "model": the tiny model, "first": the
# first wave's servers and failing start-ups (kept when the fixtures take them), "checked": when `first_wave_over` last
# looked, "plan_at": the node id whose start spawns PLAN's


def _uses(items: list[pytest.Item], *fixtures: str) -> bool:
    return any(name in item.fixturenames for item in items for name in fixtures)


def wanted(items: list[pytest.Item]) -> bool:
    """Some test of this session uses the shared servers or the demo (and vLLM is there to run them)."""
    return importlib.util.find_spec("vllm") is not None and _uses(items, "launched", "failed_starts", DEMO_FIXTURE)


def demo_argv(out: Path) -> list[str]:
    """test_demo's command: one workflow of one round (10 turns a side), the command end to end, not the demo's
    figures (`make demo`)."""
    import sys

    return [sys.executable, "-m", "kvsched.cli", "demo", "--workflows", "1", "--rounds", "1", "--no-progress",
            "--out", str(out)]


def _is_demo(item: pytest.Item) -> bool:
    return DEMO_FIXTURE in getattr(item, "fixturenames", ())


def demo_last(items: list[pytest.Item]) -> None:
    """The demo's test after every other (it uses no package fixture, so nothing is set up twice)."""
    items[:] = [i for i in items if not _is_demo(i)] + [i for i in items if _is_demo(i)]


def demo_starts_at(items: list[pytest.Item]) -> str | None:
    """The node id of the test whose start starts the demo: `DEMO_WITH`'s first, else the first after the last one in
    `BUSY_PACKAGES` (the demo's aside); None when the session runs the demo but neither."""
    if not _uses(items, DEMO_FIXTURE):
        return None
    rest = [i for i in items if not _is_demo(i)]
    if with_it := [i for i in rest if i.nodeid.startswith(DEMO_WITH + "::")]:
        return with_it[0].nodeid
    busy = [n for n, i in enumerate(rest) if i.nodeid.startswith(BUSY_PACKAGES)]
    after = rest[busy[-1] + 1:] if busy else rest
    return after[0].nodeid if after else None


def spawn_demo() -> None:
    """Start the demo (`demo_argv`) unless it was started already; test_demo.demo_run takes it."""
    from tests.integration.procs import start_together

    if "demo" not in SPAWNED:
        out = Path(tempfile.mkdtemp(prefix="kvsched-demo-")) / "demo.json"
        SPAWNED["demo"] = (start_together([demo_argv(out)]), out)
        _wave["demo_tree"] = background.Tree(SPAWNED["demo"][0].procs[0].pid)  # its servers' sessions too


def spawn(model: Path, items: list[pytest.Item]) -> None:
    from kvsched.serving import VllmServer
    from tests.integration.procs import start_together
    from tests.integration.servers import failing_starts, package_specs

    if _uses(items, DEMO_FIXTURE) and demo_starts_at(items) is None:
        spawn_demo()
    if not _uses(items, "launched", "failed_starts"):
        return
    recording = Path(tempfile.mkdtemp(prefix="kvsched-recording-")) / "secure.jsonl"
    SPAWNED["recording"] = recording
    SPAWNED["servers"] = {name: background.lower(VllmServer(spec).launch())
                          for name, spec in package_specs(model, recording).items()}
    starts = failing_starts(model)
    SPAWNED["failing_names"] = list(starts)
    SPAWNED["failing"] = background.lower(
        start_together([argv for argv, _ in starts.values()], [env for _, env in starts.values()]))
    _wave["first"] = (list(SPAWNED["servers"].values()), SPAWNED["failing"])
    plan_later(model, items)


def plan_later(model: Path, items: list[pytest.Item]) -> None:
    """What `spawn_later` will spawn for these items: test_fp8_tier's servers, and test_plan_vllm's engine at the first
    test after test_fp8_tier's."""
    ids = [item.nodeid for item in items]
    if any(n.startswith(LATER[FP8_TIER]) for n in ids):
        _wave["model"], _wave["due"] = model, {FP8_TIER}
        last = max(i for i, n in enumerate(ids) if n.startswith(LATER[FP8_TIER]))
        if any(n.startswith(LATER[PLAN]) for n in ids[last:]) and last + 1 < len(ids):
            _wave["plan_at"] = ids[last + 1]
            _wave["due"].add(PLAN)


def first_wave_over() -> bool:
    """Every failing start-up of the first wave has exited and each of its servers answers /health (or has exited:
    a fixture stopped it, or its start failed and its fixture says so)."""
    import urllib.request

    servers, failing = _wave["first"]
    if any(proc.poll() is None for proc in failing.procs):
        return False
    for server in servers:
        if server.proc is not None and server.proc.poll() is None:
            try:
                with urllib.request.urlopen(server.base + "/health", timeout=1) as r:
                    if r.status != 200:
                        return False
            except OSError:
                return False
    return True


def spawn_later(nodeid: str) -> None:
    """At a test's start: the second wave, if one is due and the first is over (looked at every `WAVE_CHECK_S`); at
    the first test after test_fp8_tier's (its three servers stopped: their memory back), test_plan_vllm's engine, so
    that its start-up overlaps the light modules between (test_fuzz, test_hostile_clients)."""
    import tempfile
    import time

    from kvsched.serving import VllmServer
    from tests.integration.servers import fp8_tier_specs, plan_specs

    due = _wave.get("due", set())
    if PLAN in due and nodeid == _wave["plan_at"]:
        due.discard(PLAN)
        specs, _ = plan_specs(_wave["model"], Path(tempfile.mkdtemp(prefix="kvsched-config-only-")))
        SPAWNED[PLAN] = {name: background.lower(VllmServer(spec).launch()) for name, spec in specs.items()}
    if FP8_TIER not in due or time.monotonic() - _wave.get("checked", 0.0) < WAVE_CHECK_S:
        return
    _wave["checked"] = time.monotonic()
    if first_wave_over():
        due.discard(FP8_TIER)
        SPAWNED[FP8_TIER] = {name: background.lower(VllmServer(spec).launch())
                             for name, spec in fp8_tier_specs(_wave["model"]).items()}


def take(key: str) -> Any:
    """What `spawn` (or `spawn_later`) left under `key`, once (None if nothing was spawned: then nothing will be, the
    fixture taking it starts its own): the fixture taking it owns it from then, at the tests' own CPU priority."""
    _wave.get("due", set()).discard(key)
    if key == "demo" and (tree := _wave.pop("demo_tree", None)) is not None:
        tree.restore()
    return background.restore(SPAWNED.pop(key, None))


def stop_untaken() -> None:
    from tests.integration.procs import stop

    for key in ("servers", *LATER):
        for server in (SPAWNED.pop(key, None) or {}).values():
            server.stop()
    if (tree := _wave.get("demo_tree")) is not None:
        tree.restore()
    _wave.clear()
    if (failing := SPAWNED.pop("failing", None)) is not None:
        stop(failing)
    if (demo := SPAWNED.pop("demo", None)) is not None:
        interrupt(demo[0])
    SPAWNED.clear()


def interrupt(started: Any, grace_s: float = 30.0) -> None:
    """SIGINT first (the demo's `finally` stops the `vllm serve` process groups it started; SIGKILL would leave them
    running), then what `procs.stop` does."""
    import signal
    import subprocess

    from tests.integration.procs import stop

    for proc in started.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
    stop(started)
