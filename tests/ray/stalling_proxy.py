"""A TCP proxy in front of a real `vllm serve` that forwards every connection byte for byte, except that while
blocked it stalls `GET /metrics`: it accepts the connection, reads the request and never answers (the client's
socket timeout is what ends it). What a scrape of a wedged or overloaded metrics endpoint meets, which a refused or
closed connection (tests/ray/standin_metrics.py) does not exercise.

Only a connection's first request is looked at: urllib (the replica's stats poll) opens one connection per request;
a client reusing a connection (httpx, for completions) gets its later requests forwarded whatever they are."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StallingProxy:
    """`blocked` (or, for a proxy in another process, the file `block_file` existing) stalls /metrics; `report_file`:
    where the counts below are written as JSON whenever they change, for a test in another process to read."""

    upstream_port: int
    block_file: str | None = None
    report_file: str | None = None
    blocked: threading.Event = field(default_factory=threading.Event)
    stalls: int = 0  # /metrics requests stalled so far
    stalled_now: int = 0  # stalled connections the client still holds open
    sent_while_stalled: int = 0  # client bytes forwarded upstream while a /metrics request was stalled
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, name="stalling-proxy", daemon=True).start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = client.recv(65536)
            if not chunk:
                client.close()
                return
            head += chunk
        if self.is_blocked() and head.startswith(b"GET /metrics"):
            self._stall(client)
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        upstream.sendall(head)
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def is_blocked(self) -> bool:
        return self.blocked.is_set() or (self.block_file is not None and Path(self.block_file).exists())

    def _report(self) -> None:
        """(Called holding the lock.)"""
        if self.report_file is not None:
            Path(self.report_file).write_text(json.dumps({"stalls": self.stalls, "stalled_now": self.stalled_now,
                                                          "sent_while_stalled": self.sent_while_stalled}))

    def _stall(self, client: socket.socket) -> None:
        """Holds the connection open, answering nothing, until the client gives up and closes it."""
        with self._lock:
            self.stalls += 1
            self.stalled_now += 1
            self._report()
        try:
            while client.recv(65536):
                pass
        except OSError:
            pass
        finally:
            with self._lock:
                self.stalled_now -= 1
                self._report()
            client.close()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while chunk := src.recv(65536):
                if from_client:
                    with self._lock:
                        if self.stalled_now:
                            self.sent_while_stalled += len(chunk)
                            self._report()
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
