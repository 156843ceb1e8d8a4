"""A TCP proxy in front of a real `vllm serve` that forwards every connection byte for byte, except that while
blocked it stalls `GET /metrics`: it accepts the connection, reads the request and never answers (the client's
socket timeout is what ends it). What a scrape of a wedged or overloaded metrics endpoint meets, which a refused or
closed connection (tests/ray/standin_metrics.py) does not exercise. With `drip_s` set, it answers the blocked scrape
instead, but slowly: one byte every `drip_s` seconds, from the status line on (`drip="head"`) or once the headers are
sent (`drip="body"`), `drip_bytes` bytes of body in all, until done or the client closes the connection: what a
socket timeout per read never ends while bytes keep coming.

Only a connection's first request is looked at: the replica's stats poll opens one connection per request;
a client reusing a connection (httpx, for completions) gets its later requests forwarded whatever they are."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
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
    drip_s: float | None = None  # None: a blocked /metrics hangs; else it drips a byte every `drip_s` s
    drip: str = "body"  # "head": from the status line on; "body": after the headers
    drip_bytes: int = 100  # the dripped answer's body (Content-Length)
    stalls: int = 0  # /metrics requests stalled (hung or dripping) so far
    stalled_now: int = 0  # stalled connections the client still holds open (a drip: until a send fails or it ends)
    dripped: int = 0  # bytes dripped so far
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
            if self.drip_s is None:
                self._stall(client)
            else:
                self._drip(client, self.drip_s)
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

    @contextlib.contextmanager
    def _stalled(self, client: socket.socket) -> Iterator[None]:
        """Counts a stalled connection while the body runs (an OSError there: the client gave up), then closes it."""
        with self._lock:
            self.stalls += 1
            self.stalled_now += 1
            self._report()
        try:
            yield
        except OSError:
            pass
        finally:
            with self._lock:
                self.stalled_now -= 1
                self._report()
            client.close()

    def _stall(self, client: socket.socket) -> None:
        """Holds the connection open, answering nothing, until the client gives up and closes it."""
        with self._stalled(client):
            while client.recv(65536):
                pass

    def _drip(self, client: socket.socket, every_s: float) -> None:
        """Answers 200 with a `drip_bytes` body, a byte every `every_s` s, until done or a send fails."""
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {self.drip_bytes}\r\n\r\n".encode()
        body = b"#" * self.drip_bytes  # a comment line, never ended: no sample the parser could take
        with self._stalled(client):
            if self.drip == "body":
                client.sendall(head)
                head = b""
            for byte in head + body:
                time.sleep(every_s)
                client.sendall(bytes((byte,)))
                with self._lock:
                    self.dripped += 1

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
