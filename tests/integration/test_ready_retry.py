"""conftest.ready: a shared server whose port another process took between its launch and its bind (early.py launches
them long before they are needed) is launched once more on another port; any other failure is raised as it was."""

from __future__ import annotations

import pytest

import kvsched.serving
from tests.integration.conftest import ready


class Fake:
    """A launched server that exits at start with `error` (None: it serves)."""

    launches: list[Fake] = []

    def __init__(self, spec: str, error: str | None = None) -> None:
        self.spec, self.error, self.stopped = spec, error, False

    def launch(self) -> Fake:
        Fake.launches.append(self)
        return self

    def wait_ready(self) -> Fake:
        if self.error:
            raise RuntimeError(f"vllm serve exited with 1:\n{self.error}")
        return self

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture(autouse=True)
def fake_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    Fake.launches = []
    monkeypatch.setattr(kvsched.serving, "VllmServer", Fake)


def test_a_server_whose_port_was_taken_is_launched_again_on_another() -> None:
    taken = Fake("spec", "OSError: [Errno 98] error while attempting to bind on address: address already in use")
    launched = {"s": taken}
    server = ready(launched, "s")
    assert taken.stopped and server is launched["s"] is Fake.launches[0] and server.spec == "spec" and not server.error


def test_any_other_failure_is_raised_and_the_server_stopped() -> None:
    broken = Fake("spec", "ValueError: bad flag")
    with pytest.raises(RuntimeError, match="bad flag"):
        ready({"s": broken}, "s")
    assert broken.stopped and Fake.launches == []
