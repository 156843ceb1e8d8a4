"""tools/soak.py's end of run and its arguments, without vLLM: `settle` against a small HTTP server of the test's
own (a sessions listing that fails is a reported failure, not a KeyError that loses the run's report), and an --out
that cannot be written refused before any server starts (found by review: checked only after the 10-minute run)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("httpx")

from tests.tools_loader import load_tool  # noqa: E402

CLEAN = {"pinned_blocks": 0, "free_blocks": 8, "total_blocks": 8, "tier_blocks": 0, "tier_bytes": 0,
         "disk_tier_blocks": 0, "active_sessions": 0}


class Sessions(BaseHTTPRequestHandler):
    """DELETE /kvsched/sessions ends 3; GET answers the server's `listing` (status, body)."""

    def do_DELETE(self) -> None:  # noqa: N802 - http.server's name
        self._answer(200, json.dumps({"ended": 3}))

    def do_GET(self) -> None:  # noqa: N802
        self._answer(*self.server.listing)  # type: ignore[attr-defined]

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Sessions)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def target(soak, httpd: ThreadingHTTPServer):
    return soak.Target("kv", f"http://127.0.0.1:{httpd.server_address[1]}", "tiny", "k0", "admin")


@pytest.mark.parametrize("listing", [(500, '{"error": "boom"}'), (200, '{"sessions": []}'), (200, "not json")])
def test_a_sessions_listing_that_fails_is_a_reported_failure(server, listing) -> None:
    soak = load_tool("soak")
    server.listing = listing
    log = soak.Log()
    out = soak.settle(target(soak, server), log, timeout_s=0.0)
    assert out["ended"] == 3 and out["error"], out
    assert [f["what"] for f in log.failures] == ["kv: the sessions' stats could not be read after every session ended"]


def test_a_clean_server_settles_without_failure(server) -> None:
    soak = load_tool("soak")
    server.listing = (200, json.dumps({"sessions": [], "stats": CLEAN}))
    log = soak.Log()
    assert soak.settle(target(soak, server), log, timeout_s=0.0) == {"ended": 3, **CLEAN}
    assert not log.failures


@pytest.mark.parametrize("out", ["/proc/soak.json", "{tmp}", "{tmp}/a-file/soak.json"])
def test_an_out_path_that_cannot_be_written_is_refused_before_any_server(tmp_path, monkeypatch, capsys, out) -> None:
    soak = load_tool("soak")
    (tmp_path / "a-file").write_text("")

    def servers(args):
        pytest.fail(f"servers made for a run whose --out {args.out} cannot be written")

    monkeypatch.setattr(soak, "servers", servers)
    with pytest.raises(SystemExit) as exc:
        soak.main(["--minutes", "0", "--out", out.format(tmp=tmp_path)])
    assert exc.value.code == 2
    assert "--out" in capsys.readouterr().err
    assert not Path("/proc/soak.json").exists()


@pytest.mark.parametrize("salted", ["-0.1", "1.5", "nan"])
def test_a_salted_share_outside_0_to_1_is_refused_before_any_server(tmp_path, monkeypatch, capsys, salted) -> None:
    soak = load_tool("soak")
    monkeypatch.setattr(soak, "servers", lambda args: pytest.fail(f"servers made with --salted {args.salted}"))
    with pytest.raises(SystemExit) as exc:
        soak.main(["--minutes", "0", "--salted", salted, "--out", str(tmp_path / "soak.json")])
    assert exc.value.code == 2 and "--salted" in capsys.readouterr().err


def test_the_disk_levels_directory_goes_when_a_server_cannot_be_built(tmp_path, monkeypatch) -> None:
    """servers() makes the directory, then builds the servers: a failure there must not leave it (review70)."""
    soak = load_tool("soak")
    made = tmp_path / "soak-disk"

    def servers(args):
        made.mkdir()
        args.disk_dir = str(made)
        raise RuntimeError("no such model")

    monkeypatch.setattr(soak, "servers", servers)
    with pytest.raises(RuntimeError, match="no such model"):
        soak.main(["--minutes", "0", "--out", str(tmp_path / "soak.json")])
    assert not made.exists()
