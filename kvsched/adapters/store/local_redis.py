"""A `redis-server` on loopback for one machine: what `kvsched ray-serve` starts when its YAML says
`store: {url: local}`, and what the tests and the migration benchmark run against (the real server, never a fake).

No persistence (`--save ""`, no append-only file): the shared level is a cache; a restarted store starts empty and
every engine recomputes what it held.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = "apt-get install -y redis-server"


class RedisUnavailable(RuntimeError):
    """No redis-server binary here (the message says how to install it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRedis:
    def __init__(self, port: int | None = None, maxmemory_mb: int = 1024, log: Path | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisUnavailable(f"redis-server is not installed ({INSTALL_HINT})")
        self.exe = exe
        self.port = port or free_port()
        self.maxmemory_mb = maxmemory_mb
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> LocalRedis:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "volatile-lru"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server not answering on port {self.port} after {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL (fault injection: the store dies mid-run)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
