"""KVSCHED_BODY_TIMEOUT_S: how long the API server's middleware waits for a generation request's whole body before its
408 (60 s, the only value before: no setting). Read where the middleware is built, checked with the engine's other
settings when `vllm serve --scheduler kvsched` parses its arguments (a bad one: exit 2 naming it, before an engine
starts). The Ray ingress has its own, `body_timeout_s` in its YAML (tests/ray/test_ingress_bodies.py)."""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.http_body import BODY_TIMEOUT_S  # noqa: E402
from kvsched.adapters.vllm.middleware import KVSchedMiddleware  # noqa: E402
from kvsched.adapters.vllm.settings_check import (  # noqa: E402
    ENV_BODY_TIMEOUT,
    body_timeout_s,
    engine_setting_errors,
    known_setting_names,
)
from tests.adapters.vllm.test_compat_levels import parser  # noqa: E402  (vLLM's options kvsched's hook reads)
from tests.adapters.vllm.test_middleware import FakeVllm  # noqa: E402
from tests.adapters.vllm.test_middleware_bodies import CHAT, run  # noqa: E402

BAD = ["0", "-1", "nan", "inf", "1e400", "abc", "60s", "1,5"]


@pytest.fixture(autouse=True)
def _no_kvsched_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("KVSCHED_")]:
        monkeypatch.delenv(var)


def test_a_short_timeout_gives_the_408_sooner(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Content-Length larger than the body sent: the 408 comes after the variable's 0.3 s, not the default 60 s,
    and says so; nothing reaches vLLM and the connection closes."""
    monkeypatch.setenv(ENV_BODY_TIMEOUT, "0.3")
    app = FakeVllm()
    mw = KVSchedMiddleware(app)
    assert mw.body_timeout_s == 0.3  # (before: 60 whatever the environment, and the run below waited for it)
    begun = time.monotonic()
    status, headers, body, _ = run(mw, app, [(b"content-length", b"%d" % (len(CHAT) + 50))], [CHAT[:5]], hang=True)
    took = time.monotonic() - begun
    assert status == 408 and headers.get(b"connection") == b"close" and app.calls == [], (status, headers)
    assert "within 0.3 s" in body["error"]["message"], body
    assert 0.3 <= took < 10, took


def test_unset_or_blank_is_the_default_and_a_whole_body_in_time_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    assert body_timeout_s({}) == body_timeout_s({ENV_BODY_TIMEOUT: "  "}) == BODY_TIMEOUT_S == 60
    assert body_timeout_s({ENV_BODY_TIMEOUT: "2.5"}) == 2.5 and body_timeout_s({ENV_BODY_TIMEOUT: " 600 "}) == 600
    monkeypatch.setenv(ENV_BODY_TIMEOUT, "5")
    app = FakeVllm()
    assert run(KVSchedMiddleware(app), app, [], [CHAT[:5], CHAT[5:]])[0] == 200 and len(app.calls) == 1
    assert ENV_BODY_TIMEOUT in known_setting_names()  # not warned about as a misspelling


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_value_stops_vllm_serve_at_start_naming_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   bad: str) -> None:
    """Through the hook `vllm serve --scheduler kvsched` runs once its arguments are parsed (compat/cli.py
    `_check_after_parsing`): exit 2 with one line naming the variable and the value. (The same run as a real `vllm
    serve` with KVSCHED_BODY_TIMEOUT_S=abc: exit 2 after 15 s, the same line; not in the suite, for its start-up.)"""
    monkeypatch.setenv(ENV_BODY_TIMEOUT, bad)
    assert [e for e in engine_setting_errors() if e.startswith(f"{ENV_BODY_TIMEOUT}={bad!r}: ")]
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["--scheduler", "kvsched"])
    assert exc.value.code == 2
    assert f"kvsched: {ENV_BODY_TIMEOUT}={bad!r}: a number of seconds above 0 (default 60)" in capsys.readouterr().err


def test_a_stock_server_is_not_stopped_by_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM without kvsched's scheduler checks no KVSCHED_* setting, and the middleware it still adds (a strict
    pass-through there) reads no body: a bad value builds it with the default."""
    monkeypatch.setenv(ENV_BODY_TIMEOUT, "abc")
    parser().parse_args([])
    assert KVSchedMiddleware(FakeVllm()).body_timeout_s == BODY_TIMEOUT_S
