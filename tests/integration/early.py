"""The integration package's shared servers (`servers.package_specs`) and its `vllm serve` start-ups that must fail
(`servers.failing_starts`), spawned when a session that will run them starts (tests/conftest.py), not when its first
integration test does: the unit tests collected before tests/integration run in one process and mostly keep one core
busy, so these start-ups (~30 CPU-seconds per server, ~15 per failing start, single-threaded imports) take the other
core meanwhile. The package's fixtures (conftest.launched, conftest.failed_starts) take them over; a session that
never gets there stops them when it ends."""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import pytest

SPAWNED: dict[str, Any] = {}  # "servers": name -> VllmServer (launched), "failing": procs.Started, "recording": Path


def wanted(items: list[pytest.Item]) -> bool:
    """Some test of this session uses the shared servers (and vLLM is there to run them)."""
    return importlib.util.find_spec("vllm") is not None and any(
        "launched" in item.fixturenames or "failed_starts" in item.fixturenames for item in items)


def spawn(model: Path) -> None:
    from kvsched.serving import VllmServer
    from tests.integration.procs import start_together
    from tests.integration.servers import failing_starts, package_specs

    recording = Path(tempfile.mkdtemp(prefix="kvsched-recording-")) / "secure.jsonl"
    SPAWNED["recording"] = recording
    SPAWNED["servers"] = {name: VllmServer(spec).launch() for name, spec in package_specs(model, recording).items()}
    starts = failing_starts(model)
    SPAWNED["failing_names"] = list(starts)
    SPAWNED["failing"] = start_together([argv for argv, _ in starts.values()], [env for _, env in starts.values()])


def take(key: str) -> Any:
    """What `spawn` left under `key`, once (None if nothing was spawned): the fixture taking it owns it from then."""
    return SPAWNED.pop(key, None)


def stop_untaken() -> None:
    from tests.integration.procs import stop

    for server in (SPAWNED.pop("servers", None) or {}).values():
        server.stop()
    if (failing := SPAWNED.pop("failing", None)) is not None:
        stop(failing)
    SPAWNED.clear()
