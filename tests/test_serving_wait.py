"""`VllmServer.wait_ready` on a server launched long before it is asked (the integration package's shared servers are
launched together and waited for by the module that first needs each): one that serves is ready at once, one that
never serves fails with the start-up timeout. A small HTTP process stands in for `vllm serve`'s /health."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvsched.serving import ServerExited, ServerSpec, VllmServer

# Stand-ins take SIGINT as vllm serve does (it installs its own handler): a shell that runs the suite in the background
# starts it with SIGINT ignored, which Python would inherit, and `stop()` would then wait its 30 s for the SIGKILL.
SIGINT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
HEALTH = SIGINT + """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/v1/models" and sys.argv[2] == "401":
            self.send_response(401); self.end_headers(); return
        body = json.dumps({"data": [{"id": sys.argv[2]}]}).encode() if self.path == "/v1/models" else b""
        self.send_response(200 if self.path in ("/health", "/v1/models") else 404); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def stand_in(tmp_path: Path, serves: bool, model: str = "tiny") -> VllmServer:
    """A process on the server's port: /health (if `serves`) and /v1/models listing `model` ("401": refused)."""
    server = VllmServer(ServerSpec(model=tmp_path), log_path=tmp_path / "log", startup_timeout_s=1.0)
    code = HEALTH if serves else SIGINT + "import time; time.sleep(60)"
    server.proc = subprocess.Popen([sys.executable, "-c", code, str(server.port), model], start_new_session=True)
    return server


def test_a_server_launched_longer_ago_than_the_timeout_that_serves_is_ready(tmp_path: Path) -> None:
    server = stand_in(tmp_path, serves=True)
    try:
        deadline = time.monotonic() + 20
        while not serving(server):  # the stand-in is up
            assert time.monotonic() < deadline, "the stand-in never served"
            time.sleep(0.1)
        server._deadline = time.monotonic() - 60  # launched "long ago": its start-up timeout ran out a minute ago
        assert server.wait_ready() is server  # before the fix: TimeoutError, and the server stopped
        assert server.proc is not None and server.proc.poll() is None
    finally:
        began = time.monotonic()
        server.stop()
    assert time.monotonic() - began < 10  # stopped by its SIGINT, not by the SIGKILL after stop's timeout


def serving(server: VllmServer) -> bool:
    try:
        with urllib.request.urlopen(server.base + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_a_server_that_never_serves_times_out_and_is_stopped(tmp_path: Path) -> None:
    server = stand_in(tmp_path, serves=False)
    server._deadline = time.monotonic() + 1.0
    with pytest.raises(TimeoutError, match="not ready after 1s"):
        server.wait_ready()
    assert server.proc is not None and server.proc.poll() is not None  # stopped, not left running


def test_start_on_a_launched_server_that_died_raises_instead_of_launching_again(tmp_path: Path) -> None:
    server = VllmServer(ServerSpec(model=tmp_path), log_path=tmp_path / "log", startup_timeout_s=5.0)
    server.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"], start_new_session=True)
    server.proc.wait()
    with pytest.raises(RuntimeError, match="exited with status 3"):
        server.start()


def test_a_port_another_server_took_is_not_taken_for_ours(tmp_path: Path) -> None:
    """Found by review: the port is picked free, then released; whatever answered /health on it passed for vllm serve
    (and the replay read that process's /metrics)."""
    server = stand_in(tmp_path, serves=True, model="someone-else")
    try:
        deadline = time.monotonic() + 20
        while not serving(server):
            assert time.monotonic() < deadline, "the stand-in never served"
            time.sleep(0.1)
        server._deadline = time.monotonic() + 1.0
        with pytest.raises(TimeoutError):
            server.wait_ready()
    finally:
        server.stop()


def test_a_server_whose_models_need_a_key_it_was_not_given_is_ready_on_its_health(tmp_path: Path) -> None:
    server = stand_in(tmp_path, serves=True, model="401")  # e.g. --api-key passed in extra_args
    try:
        server._deadline = time.monotonic() + 20
        assert server.wait_ready() is server
    finally:
        server.stop()


def test_a_server_killed_while_in_use_is_named_with_its_signal_and_log(tmp_path: Path) -> None:
    """A metrics read of a server another process killed says so, with its log, not only `Connection refused` (how
    test_demo failed when a test killed the demo's servers)."""
    server = stand_in(tmp_path, serves=True)
    (tmp_path / "log").write_text("Application startup complete.\n")
    try:
        server._deadline = time.monotonic() + 20
        server.wait_ready()
        assert server.proc is not None
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        with pytest.raises(ServerExited, match=r"(?s)was killed by SIGKILL while in use \(.*refused.*startup complete"):
            server.metrics()
    finally:
        server.stop()


def test_an_engine_core_dead_before_the_start_up_ended_fails_it_at_once(tmp_path: Path) -> None:
    """vLLM's API server outlives its engine core, never serving: the start-up fails when the log says so, not at its
    timeout (a shared test server held the suite 300 s so)."""
    server = VllmServer(ServerSpec(model=tmp_path), log_path=tmp_path / "log", startup_timeout_s=60.0)
    line = "(APIServer pid=1) WARNING [core_client.py:817] [shutdown] MPClient: engine core exited unexpectedly\n"
    # the line written once the stand-in takes SIGINT (run in the background, a suite starts with SIGINT ignored:
    # stopped before its handler, it waited out stop()'s 30 s in a fresh clone's run)
    code = SIGINT + f"open({str(tmp_path / 'log')!r}, 'a').write({line!r})\nimport time; time.sleep(60)\n"
    server.proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    server._deadline = time.monotonic() + 60
    began = time.monotonic()
    with pytest.raises(ServerExited, match="engine core died while starting"):
        server.wait_ready()
    assert time.monotonic() - began < 30
    assert server.proc is not None and server.proc.poll() is not None  # stopped, not left running
