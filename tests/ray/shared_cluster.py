"""tests/ray's shared Ray cluster and its early start-ups (the fixtures and hooks: conftest.py). Where the package's
time went (a suite run at 4d39db4: 314 s of it, the two cores 40-77% idle) was waiting for clusters and `vllm serve`
start-ups, one after another.

One local Ray cluster with Serve (`start_cluster`) for every module that deploys a Serve app: each deploys its app
(`deployed`) and deletes it at its end, where each started and shut down a cluster of its own (ray.init, serve.start,
serve.shutdown, ray.shutdown: seconds each, five times).

A module's `EARLY` start-ups (name -> `Early`) begin at the first test of such a module, for the module's fixture or
test to take (`early`), so that `vllm serve` start-ups (CPU-bound: ~30 CPU-seconds each) run while the package's tests
wait, not one after another in front of each module. The cluster starts first (found in a first run: started beside
two `vllm serve` start-ups, Serve's HTTP proxy failed its readiness checks and `serve.start` raised). An engine
replica outside Ray starts in a thread of its own; a Serve app with real engines is deployed without waiting
(`start_app`: Ray's driver calls stay in the main thread), its replicas starting in Ray's processes, once the start-up
it follows (`Early.after`) is over. What a session never takes is stopped when it ends."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# A replica's drain at shutdown sleeps Ray's `graceful_shutdown_wait_loop_s` (2 s) before it first counts the
# requests it still holds: set on the tests' own deployments, where nothing is in flight at their end.
QUICK_DRAIN = {"graceful_shutdown_wait_loop_s": 0.1}
RAY_MODULES = "tests.ray."
PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"  # Ray Serve's (serve/_private/constants.py), seconds

_cluster: dict[str, Any] = {}


def start_cluster() -> dict[str, Any]:
    """The package's Ray cluster (2 CPUs, Serve's HTTP proxy on a free loopback port, Ray's metrics on another),
    started at the first call. Ray exports metrics every second (its default: 10 s), so a gauge a test waits for
    reaches Ray's metrics endpoint within seconds."""
    if not _cluster:
        import ray
        from ray import serve

        from kvsched.adapters.ray.proxy import controller_options  # as `kvsched ray-serve` starts Serve
        from kvsched.serving import free_port

        # Serve's controller kills its HTTP proxy after three readiness checks of 5 s each go unanswered, and
        # `serve.start`, waiting for that proxy, raises. Ray runs the proxy at nice 15: with two CPU-bound processes
        # at nice 0 beside it, it was not ready 17 s after it started (three checks failed, the fixture's set-up
        # failed). The cluster's processes inherit this from the driver; `serve.start` still gives up after 60 s.
        os.environ.setdefault(PROXY_READY_ENV, "60")
        port, metrics_port = free_port(), free_port()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
                 _system_config={"metrics_report_interval_ms": 1000})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, controller_options=controller_options())
        except BaseException:
            ray.shutdown()
            raise
        _cluster.update(port=port, base=f"http://127.0.0.1:{port}", metrics=f"http://127.0.0.1:{metrics_port}/metrics",
                        logs=Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve")
    return _cluster


def stop_cluster() -> None:
    if _cluster:
        import ray
        from ray import serve

        _cluster.clear()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def start_app(app: Any, name: str, route_prefix: str | None = "/") -> str:
    """Deploy `app` on the package's cluster without waiting for its replicas (`wait_running` does)."""
    from ray import serve

    start_cluster()
    serve.run_many([serve.RunTarget(app, name=name, route_prefix=route_prefix)],
                   wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    return name


def wait_running(name: str, timeout_s: float = 600.0) -> None:
    """Until Serve calls the app RUNNING, as `serve.run` waits; a failed deployment raises with Ray's message."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Serve app {name} is {app.status}: {app.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"Serve app {name} not running after {timeout_s:g} s: {app}")
        time.sleep(0.2)


def delete_app(name: str) -> None:
    """The app's replicas shut down and the app gone (`serve.delete` waits for both)."""
    from ray import serve

    if _cluster:
        serve.delete(name)


@contextmanager
def deployed(app: Any, name: str = "kvsched", route_prefix: str | None = "/") -> Iterator[None]:
    """`app` running on the package's cluster for the block, deleted at its end."""
    try:
        wait_running(start_app(app, name, route_prefix))
        yield
    finally:
        delete_app(name)


@dataclass
class Early:
    """A start-up begun before its module's tests: `start()` (in a thread of its own unless `main_thread`), and
    `stop(what it returned)` should no test take it. `after` ("module:name"): it begins when that start-up is taken
    (its CPU-bound start over), not beside it, if the session has it. `once_over` (a module's name): it begins at the
    first test after that module's tests (its engines stopped), if the session has them."""

    start: Callable[[], Any]
    stop: Callable[[Any], None]
    main_thread: bool = False
    after: str | None = None
    once_over: str | None = None


class Started:
    """An `Early` start-up under way: `result()` waits for it and returns what it returned (or raises what it
    raised); `discard()` waits for it and stops what it started."""

    def __init__(self, how: Early) -> None:
        self.how = how
        self._out: list[Any] = []
        self._error: list[BaseException] = []
        self._thread: threading.Thread | None = None
        if how.main_thread:
            self._run()
        else:
            self._thread = threading.Thread(target=self._run, name="tests-ray-early", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._out.append(self.how.start())
        except BaseException as exc:  # noqa: BLE001 - raised to the test that takes it
            self._error.append(exc)

    def result(self) -> Any:
        if self._thread is not None:
            self._thread.join()
        if self._error:
            raise self._error[0]
        return self._out[0]

    def discard(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._out:
            self.how.stop(self._out[0])


_early: dict[str, Started] = {}  # by "module:name"
_after: dict[str, list[tuple[str, Early]]] = {}  # "module:name" -> the start-ups that begin once it is taken
_once_over: dict[str, list[tuple[str, Early]]] = {}  # a module's name -> the start-ups that begin after its tests
_ran: list[str] = []  # the tests/ray modules whose tests have begun, in order
_early_begun: list[bool] = []


def ray_modules(items: list[pytest.Item]) -> list[Any]:
    """The tests/ray modules of these items, in their order."""
    mods = [getattr(i, "module", None) for i in items]
    return list(dict.fromkeys(m for m in mods if m is not None and m.__name__.startswith(RAY_MODULES)))


def begins_at(items: list[pytest.Item]) -> str | None:
    """The node id of the test whose set-up begins the start-ups (`begin_early`) in a session that runs tests/ray's
    after tests/integration: the first test after the integration package's (tests/ops, tests/ray's unit tests: ~1
    core idle for ~18 s, suite69's sampler), None if there is no such test."""
    first = next((n for n, i in enumerate(items) if getattr(getattr(i, "module", None), "EARLY", None)
                  and i.module.__name__.startswith(RAY_MODULES)), None)
    last = max((n for n, i in enumerate(items[:first or 0]) if i.nodeid.startswith("tests/integration/")), default=None)
    return None if first is None or last is None else items[last + 1].nodeid


def begin_early(items: list[pytest.Item]) -> None:
    """Once per session: the cluster, if a test of these items uses it, then every `EARLY` start-up of their tests/ray
    modules (those `after` another one: when it is taken)."""
    if _early_begun:
        return
    _early_begun.append(True)
    if any("serve_cluster" in getattr(i, "fixturenames", ()) for i in items):
        start_cluster()
    todo = {f"{mod.__name__}:{name}": how for mod in ray_modules(items)
            for name, how in getattr(mod, "EARLY", {}).items()}
    if todo:  # built here, once, should the start-ups' threads find it missing
        from kvsched.tiny_model import ensure_tiny_model

        ensure_tiny_model("test")
    modules = {mod.__name__ for mod in ray_modules(items)}
    for key, how in todo.items():
        if how.after in todo:
            _after.setdefault(how.after, []).append((key, how))
        elif how.once_over in modules:
            _once_over.setdefault(how.once_over, []).append((key, how))
        else:
            _early[key] = Started(how)


def module_begins(module: Any) -> None:
    """At each tests/ray test's set-up: the start-ups waiting for the modules before this one (`once_over`) begin."""
    name = getattr(module, "__name__", "")
    if not _ran or _ran[-1] != name:
        _ran.append(name)
    for done in [m for m in _once_over if m in _ran[:-1]]:
        for key, how in _once_over.pop(done):
            _early[key] = Started(how)


def early(module: Any, name: str) -> Any:
    """What `module.EARLY[name]` started (started now if nothing did), the caller's from now; the start-ups waiting
    for it begin."""
    key = f"{module.__name__}:{name}"
    started = _early.pop(key, None)
    for waiting in _once_over.values():  # taken before its turn came: not started a second time
        waiting[:] = [(k, how) for k, how in waiting if k != key]
    try:
        return module.EARLY[name].start() if started is None else started.result()
    finally:
        for then, how in _after.pop(key, []):
            _early[then] = Started(how)


def stop_untaken() -> None:
    """Stops the early start-ups no test took (a session stopped before their tests ran)."""
    _after.clear()
    _once_over.clear()
    while _early:
        _, started = _early.popitem()
        try:
            started.discard()
        except Exception as exc:  # noqa: BLE001 - what is left is stopped with the cluster
            print(f"tests/ray: an early start-up no test took failed to stop: {exc!r}")
