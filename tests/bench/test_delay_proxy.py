"""The benchmarks' delaying proxy (kvsched.bench.delay_proxy) forwards bytes intact both ways and refuses a negative
delay; a benchmark script's JSON names the command that ran it."""

from __future__ import annotations

import socket
import threading

import pytest

from kvsched.bench.delay_proxy import delayed


def echo_server() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(bytes(b ^ 0xFF for b in data))  # per byte: however the stream is cut

    threading.Thread(target=serve, daemon=True).start()
    return srv, int(srv.getsockname()[1])


def test_bytes_go_through_intact_both_ways() -> None:
    srv, port = echo_server()
    try:
        with delayed(port, 0.002) as proxy_port, socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as c:
            for message in (b"PING", bytes(range(256)) * 64):
                c.sendall(message)
                got = b""
                while len(got) < len(message):
                    got += c.recv(65536)
                assert got == bytes(b ^ 0xFF for b in message)
    finally:
        srv.close()


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"), delayed(1, -0.001):
        pass


def test_a_benchmark_script_records_the_command_that_ran_it(monkeypatch) -> None:
    """Found while adding benchmarks/store_lookup_step.py: a script's JSON named its command `kvsched --out ...`."""
    from kvsched.bench.common import provenance

    monkeypatch.setattr("sys.argv", ["benchmarks/store_lookup_step.py", "--out", "x.json"])
    assert provenance()["command"] == "python benchmarks/store_lookup_step.py --out x.json"
    monkeypatch.setattr("sys.argv", ["/venv/bin/kvsched", "bench", "sched", "--quick"])
    assert provenance()["command"] == "kvsched bench sched --quick"
