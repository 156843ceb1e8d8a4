"""A client that writes an HTTP request as given, body and all, while it reads the answer (as curl does), and reads
the answer to the connection's end, telling a reset from a clean close: what a client of a server that refuses a body
midway sees (tests/ray/test_ingress_bodies.py, tests/integration/test_hostile_bodies.py)."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any


def exchange(port: int, path: str, head: list[bytes], parts: list[bytes], every_s: float = 0.0,
             version: bytes = b"1.1", timeout_s: float = 30.0) -> tuple[bytes, str | None]:
    """A POST written as given (`head`: its header lines; `parts`: what follows them, sent one part every `every_s`
    s by a thread of its own, as curl sends a body while it reads), the answer read to the connection's end: (the
    answer's bytes, the error that ended the reading, if any: a reset)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    lines = [b"POST " + path.encode() + b" HTTP/" + version, b"host: 127.0.0.1", b"content-type: application/json",
             *head]
    sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")

    def write() -> None:
        try:
            for part in parts:
                sock.sendall(part)
                time.sleep(every_s)
        except OSError:
            pass  # the server answered and closed: what it answered is read below

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    answer, failure = b"", None
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError as exc:
        failure = repr(exc)
    finally:
        sock.close()
        writer.join(timeout_s)
    return answer, failure


def answered(answer: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, the JSON body read to its declared length) of a whole answer; AssertionError if cut short."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert len(body) == int(headers["content-length"]), answer[:400]
    return int(status_line.split()[1]), headers, json.loads(body)


def chunked(body: bytes, size: int = 1 << 16) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)] + [
        b"0\r\n\r\n"]
