"""Servers of this package that more than one module uses, or that start together (`servers.py`). The hardened
`vllm serve --scheduler kvsched` is shared by the security, zero-change-client and fuzz tests (each test uses its own
session ids, salts or keys, so they do not interfere): two API keys (two tenants), an admin key, the operator's
compaction (summarize, small trigger) and vLLM's Responses store (for previous_response_id). Also shared: compaction's,
stock vLLM's and the fp8 KV cache's (servers.py)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from tests.integration import early
from tests.integration.servers import failing_starts, package_specs, serve_spec


@pytest.fixture(scope="package")
def secure_recording(tmp_path_factory):
    """The trace file the shared hardened server records its requests to (early.spawn's when it launched them)."""
    return early.SPAWNED.get("recording") or tmp_path_factory.mktemp("recording") / "secure.jsonl"


@pytest.fixture(scope="package")  # stopped when tests/integration ends: later packages get their memory back
def launched(tiny_model_dir, secure_recording):
    """The package's shared servers: spawned together when the session started (early.py) or else when the first is
    needed (each fixture below waits for its own); a module's server is stopped when the last module using it ends,
    the rest when the package does."""
    pytest.importorskip("vllm")
    from kvsched.serving import VllmServer

    servers = early.take("servers") or {
        name: VllmServer(spec) for name, spec in package_specs(tiny_model_dir, secure_recording).items()}
    try:
        for server in servers.values():
            if server.proc is None:  # not launched when the session started
                server.launch()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def ready(launched, name):
    """`launched[name]`, serving (`ready_server`; the one launched again replaces it in `launched`)."""
    launched[name] = ready_server(launched[name])
    return launched[name]


def ready_server(server):
    """`server`, serving. One whose port was taken before it bound it (picked free at its launch, which may be long
    before: early.py) is launched again on another port, once: that one is returned."""
    from kvsched.serving import VllmServer

    for attempt in (1, 2):
        try:
            return server.wait_ready()
        except BaseException as exc:
            server.stop()
            if attempt == 2 or not isinstance(exc, RuntimeError) or "address already in use" not in str(exc).lower():
                raise
        server = VllmServer(server.spec).launch()
    raise AssertionError("unreachable")


@contextmanager
def started_early(key, specs):
    """A module's own servers, serving, by name: those early.py spawned under `key` (once the session's first
    start-ups were over), else launched now, together; all stopped at the block's end (a failed start-up stops them
    too, and raises)."""
    pytest.importorskip("vllm")
    from kvsched.serving import VllmServer

    named = early.take(key) or {name: VllmServer(spec) for name, spec in specs.items()}
    try:
        for server in named.values():
            if server.proc is None:
                server.launch()
        for name in named:
            named[name] = ready_server(named[name])
        yield named
    finally:
        for server in named.values():
            server.stop()


@pytest.fixture(scope="package")
def secure_server(launched):
    return ready(launched, "secure")


FINISHED_MODULES: set[str] = set()


def stop_after_its_last_module(request, fixture, server):
    """Stop `server` when no module of this run that uses `fixture` is left to run (its memory back for the rest of
    the package); in any order of modules. Called at the teardown of each module that uses it."""
    FINISHED_MODULES.add(request.node.nodeid)
    users = {item.getparent(pytest.Module).nodeid for item in request.session.items if fixture in item.fixturenames}
    if users <= FINISHED_MODULES:
        server.stop()


@pytest.fixture(scope="module")
def compaction_server(launched, request):
    """test_compaction's and test_compaction_templates' (one start-up: servers.py)."""
    server = ready(launched, "compaction")
    yield server
    stop_after_its_last_module(request, "compaction_server", server)


@pytest.fixture(scope="module")
def fp8_kv_server(launched, request):
    """test_fp8_kv's and test_fp8_tier's tier over an fp8 cache (one start-up: servers.py)."""
    from tests.cpu import require_fp8_kv_cache

    require_fp8_kv_cache()
    server = ready(launched, "fp8_kv")
    yield server
    stop_after_its_last_module(request, "fp8_kv_server", server)


@pytest.fixture(scope="module")
def stock_server(launched):
    """Stock vLLM (no --scheduler) serving the tiny model as "replay", its KV pool sized by vLLM from 1 GiB
    (servers.py): test_trace_replay's, test_serve's, test_plan_vllm's and test_fp8_tier's (the decoding a restored turn
    must match). Nothing of kvsched runs in it, so what one
    module sends cannot change another's result but through vLLM's own prefix cache (each sends prompts of its own)."""
    return ready(launched, "replay")


@pytest.fixture(scope="package")
def serve_launched(tiny_model_dir):
    """test_serve's server (servers.serve_spec), spawned without waiting: by test_plan_vllm (launch_meanwhile), so that
    its start-up overlaps that module's (in the background until test_serve takes it: tests/background.py), or by
    test_serve itself; stopped when test_serve ends (its kvsched_server)."""
    pytest.importorskip("vllm")
    from kvsched.serving import VllmServer
    from tests import background

    server = VllmServer(serve_spec(tiny_model_dir))
    try:
        yield background.lower(server.launch())
    finally:
        server.stop()


def launch_meanwhile(request, fixture):
    """Spawn a later module's server now (its fixture launches without waiting): its start-up overlaps this module's
    own, which alone leaves a core idle."""
    request.getfixturevalue(fixture)


@pytest.fixture(scope="package")
def failed_starts(tiny_model_dir):
    """Every `vllm serve` of the package that must fail at start (servers.failing_starts), run at once: name -> its
    exit code and output."""
    pytest.importorskip("vllm")
    from tests.integration.procs import collect, start_together

    spawned, names = early.take("failing"), early.take("failing_names")
    if spawned is None:  # not spawned when the session started (early.py)
        starts = failing_starts(tiny_model_dir)
        spawned, names = start_together([argv for argv, _ in starts.values()], [env for _, env in starts.values()]), \
            list(starts)
    # up to six at once on 2 cores: a larger timeout than one alone needs (a slow host is not a failure)
    return dict(zip(names, collect(spawned, timeout_s=600), strict=True))
