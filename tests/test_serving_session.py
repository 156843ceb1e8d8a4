"""Where `VllmServer.launch` puts the server: always a process group of its own (stopped as a unit); a session of its
own, or the caller's (`ServerSpec.own_session`). A sleeping process stands in for `vllm serve`."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvsched.serving import ServerSpec, VllmServer


@dataclass
class SleeperSpec(ServerSpec):
    def argv(self, port: int) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(60)"]


@pytest.mark.parametrize("own_session", [True, False])
def test_the_server_leads_its_own_group_in_the_session_asked_for(tmp_path: Path, own_session: bool) -> None:
    server = VllmServer(SleeperSpec(model=tmp_path, own_session=own_session), log_path=tmp_path / "log")
    server.launch()
    assert server.proc is not None
    try:
        pid = server.proc.pid
        assert os.getpgid(pid) == pid
        assert os.getsid(pid) == (pid if own_session else os.getsid(0))
    finally:
        server.proc.kill()
        server.proc.wait()
