"""`kvsched ray-serve` starts Serve with Ray's HTTP proxy reading no session header of its own (proxy.py): a
non-UTF-8 X-Session-Id then reaches kvsched's ingress (its 400) instead of Ray's 500; and with kvsched's middleware in
the proxy (proxy_headers.py), which answers 400 to the headers the proxy still decodes for itself, exactly those that
Ray's own code fails to decode. The behaviour on a real cluster: tests/ray/test_hostile_ingress.py, whose cluster
starts Serve with the same options. No cluster here."""

from __future__ import annotations

import argparse
import json
import threading
from typing import Any

import pytest

from kvsched.adapters.ray.proxy import (
    RAY_PROXY_CALLBACK_ENV,
    RAY_SESSION_HEADER_ENV,
    RAY_SESSION_HEADER_OFF,
    controller_options,
)
from kvsched.adapters.ray.proxy_body import ENV_PROXY_MAX_BODY
from kvsched.adapters.ray.proxy_headers import CALLBACK
from kvsched.adapters.ray.requests import MAX_BODY_BYTES


def test_no_http_header_can_carry_the_name_rays_proxy_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header's name is an HTTP token (RFC 9110 5.1): Ray's match (lower case, `-` as `_`) can find none."""
    monkeypatch.delenv(RAY_PROXY_CALLBACK_ENV, raising=False)
    token = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert not set(RAY_SESSION_HEADER_OFF) <= token
    assert controller_options() == {"runtime_env": {"env_vars": {RAY_SESSION_HEADER_ENV: RAY_SESSION_HEADER_OFF,
                                                                 ENV_PROXY_MAX_BODY: str(MAX_BODY_BYTES),
                                                                 RAY_PROXY_CALLBACK_ENV: CALLBACK}}}
    from ray.serve.config import ControllerOptions

    ControllerOptions(**controller_options())  # Ray's own check of the options (env_vars only, strings)


def test_kvsched_ray_serve_starts_serve_with_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray import serve
    from ray.serve.schema import ServeStatus

    from kvsched.adapters.ray.config import parse_config
    from kvsched.commands import ray_serve

    started: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **kw: started.update(kw))
    monkeypatch.setattr(serve, "run", lambda *a, **kw: None)
    monkeypatch.setattr(serve, "status", lambda: ServeStatus())  # (no other application on the cluster)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "delete", lambda *a, **kw: None)  # (Ray initialized already: a joined cluster's stop)
    monkeypatch.setattr(threading.Event, "wait", lambda self, timeout=None: True)  # Ctrl-C at once
    monkeypatch.setattr(ray_serve.signal, "signal", lambda *a: None)
    monkeypatch.setattr("kvsched.adapters.ray.app.build_app", lambda cfg: "app")
    cfg = parse_config({"pools": [{"name": "w", "model": "/m", "models": ["w"], "replicas": 1}],
                        "max_body_bytes": 4096})
    assert ray_serve._serve(argparse.Namespace(address=None, num_cpus=None), cfg) == 0
    assert started["controller_options"] == controller_options(4096), started  # the proxy's body limit: the config's
    assert started["controller_options"]["runtime_env"]["env_vars"][ENV_PROXY_MAX_BODY] == "4096"


def asgi_call(app: Any, scope: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs the ASGI `app` on one request `scope` (no body): the messages it sent."""
    import asyncio

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def http_scope(headers: list[tuple[bytes, bytes]], kind: str = "http") -> dict[str, Any]:
    return {"type": kind, "method": "POST", "path": "/v1/chat/completions", "root_path": "", "query_string": b"",
            "headers": [(b"host", b"x"), *headers], "client": ("127.0.0.1", 4242)}


async def served(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def ray_reads(headers: list[tuple[bytes, bytes]]) -> None:
    """What Ray 2.60's HTTP proxy does with a request's headers before the app sees it (its RequestIdMiddleware, then
    `setup_request_context_and_handle`, the timeout and disconnect headers of `send_request_to_replica`,
    `populate_tracing_context`), run by Ray's own code: raises where Ray's proxy answered 500."""
    import contextvars

    from ray.serve._private.http_util import (
        RequestIdMiddleware,
        parse_disconnect_disabled_header,
        parse_request_timeout_header,
    )
    from ray.serve._private.proxy import HTTPProxy
    from ray.serve._private.proxy_request_response import ASGIProxyRequest

    class Handle:
        def options(self, **kw: Any) -> Handle:
            return self

    async def proxy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = ASGIProxyRequest(scope, receive, send)
        request.populate_tracing_context()
        contextvars.copy_context().run(HTTPProxy.setup_request_context_and_handle, None, "app", Handle(), "/",
                                       request, "internal-id")  # (in a context of its own: it sets Serve's)
        parse_request_timeout_header(dict(request.headers), 30.0)
        parse_disconnect_disabled_header(dict(request.headers))

    asgi_call(RequestIdMiddleware(proxy), http_scope(headers))


NAMES = [b"x-request-id", b"x_request_id", b"serve_multiplexed_model_id", b"serve-multiplexed-model-id",
         b"SERVE-Multiplexed-MODEL_id", b"x-request-timeout-seconds", b"x-request-disconnect-disabled",
         b"x-session-id", b"x_session_id", b"traceparent", b"tracestate", b"x-agent-role", b"x-request-ids"]


@pytest.mark.parametrize("tracing", [False, True])
def test_the_middleware_refuses_exactly_the_headers_rays_proxy_fails_to_decode(
        monkeypatch: pytest.MonkeyPatch, tracing: bool) -> None:
    """Each name (Ray's own, their spellings, others) with a value that is no UTF-8, with Ray's session header at its
    default and as kvsched sets it, tracing off and on: the middleware answers 400 naming the header exactly when
    Ray's own header reading raises (Ray's 500), and passes the request untouched otherwise."""
    import ray.serve._private.tracing_utils as tracing_utils

    from kvsched.adapters.ray import proxy_headers

    monkeypatch.setattr(tracing_utils, "_tracing_enabled", tracing)
    for session_header in ("x-session-id", RAY_SESSION_HEADER_OFF):
        monkeypatch.setattr(proxy_headers, "FOLDED", frozenset({"serve_multiplexed_model_id",
                                                                session_header.lower().replace("-", "_")}))
        monkeypatch.setattr("ray.serve._private.http_util.SERVE_SESSION_ID", session_header)
        refused: set[str] = set()
        for name in NAMES:
            for value in (b"\xff", b"caf\xe9", b"a\x80b", "日本".encode(), b"ascii"):
                headers = [(name.lower(), value)]
                try:
                    ray_reads(headers)
                    fails = False
                except UnicodeDecodeError:
                    fails = True
                sent = asgi_call(proxy_headers.RayHeadersUtf8(served), http_scope(headers))
                case = (session_header, name, value, sent)
                if fails:
                    refused.add(name.decode())
                    assert sent[0]["status"] == 400, case
                    error = json.loads(sent[1]["body"])["error"]
                    assert error["param"] == name.decode().lower() and "UTF-8" in error["message"], case
                else:
                    assert sent == [{"type": "http.response.start", "status": 200, "headers": []},
                                    {"type": "http.response.body", "body": b"ok"}], case
        assert {"x-request-id", "serve-multiplexed-model-id", "x-request-timeout-seconds"} <= refused, refused
        assert ("x-session-id" in refused) == (session_header == "x-session-id"), refused
        assert ("traceparent" in refused) == tracing and not {"x-agent-role", "x_request_id"} & refused, refused


def test_a_websocket_with_such_a_header_is_closed_before_it_is_accepted() -> None:
    from kvsched.adapters.ray.proxy_headers import RayHeadersUtf8

    sent = asgi_call(RayHeadersUtf8(served), http_scope([(b"x-request-id", b"\xff")], "websocket"))
    assert [m["type"] for m in sent] == ["websocket.close"] and "x-request-id" in sent[0]["reason"], sent
    assert asgi_call(RayHeadersUtf8(served), {"type": "lifespan"})[0]["status"] == 200  # other scopes pass


def test_ray_loads_the_callback_and_runs_it_before_its_own_middleware() -> None:
    """As Ray's proxy builds its app (`configure_http_middlewares`, `_apply_middlewares`) from the variable
    kvsched sets: kvsched's 400 comes before Ray's RequestIdMiddleware, and a normal request passes through both."""
    from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    callback = controller_options()["runtime_env"]["env_vars"][RAY_PROXY_CALLBACK_ENV]
    app = _apply_middlewares(served, validate_http_proxy_callback_return(call_function_from_import_path(callback)))
    sent = asgi_call(app, http_scope([(b"x-request-id", b"\xff")]))
    assert sent[0]["status"] == 400 and not any(k == b"x-request-id" for k, _ in sent[0]["headers"]), sent
    sent = asgi_call(app, http_scope([(b"x-request-id", "日本".encode())]))
    assert sent[0]["status"] == 200 and (b"x-request-id", "日本".encode()) in sent[0]["headers"], sent


def test_a_proxy_callback_of_the_users_is_kept(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(RAY_PROXY_CALLBACK_ENV, "mine:middlewares")
    assert controller_options() == {"runtime_env": {"env_vars": {RAY_SESSION_HEADER_ENV: RAY_SESSION_HEADER_OFF,
                                                                 ENV_PROXY_MAX_BODY: str(MAX_BODY_BYTES)}}}
    assert "mine:middlewares is kept" in caplog.text
