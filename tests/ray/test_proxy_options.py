"""`kvsched ray-serve` starts Serve with Ray's HTTP proxy reading no session header of its own (proxy.py): a
non-UTF-8 X-Session-Id then reaches kvsched's ingress (its 400) instead of Ray's 500. The behaviour on a real cluster:
tests/ray/test_hostile_ingress.py, whose cluster starts Serve with the same options. No cluster here."""

from __future__ import annotations

import argparse
import threading
from typing import Any

import pytest

from kvsched.adapters.ray.proxy import RAY_SESSION_HEADER_ENV, RAY_SESSION_HEADER_OFF, controller_options


def test_no_http_header_can_carry_the_name_rays_proxy_is_given() -> None:
    """A header's name is an HTTP token (RFC 9110 5.1): Ray's match (lower case, `-` as `_`) can find none."""
    token = set("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert not set(RAY_SESSION_HEADER_OFF) <= token
    assert controller_options() == {"runtime_env": {"env_vars": {RAY_SESSION_HEADER_ENV: RAY_SESSION_HEADER_OFF}}}
    from ray.serve.config import ControllerOptions

    ControllerOptions(**controller_options())  # Ray's own check of the options (env_vars only, strings)


def test_kvsched_ray_serve_starts_serve_with_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray import serve

    from kvsched.adapters.ray.config import parse_config
    from kvsched.commands import ray_serve

    started: dict[str, Any] = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **kw: started.update(kw))
    monkeypatch.setattr(serve, "run", lambda *a, **kw: None)
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.setattr(threading.Event, "wait", lambda self, timeout=None: True)  # Ctrl-C at once
    monkeypatch.setattr(ray_serve.signal, "signal", lambda *a: None)
    monkeypatch.setattr("kvsched.adapters.ray.app.build_app", lambda cfg: "app")
    cfg = parse_config({"pools": [{"name": "w", "model": "/m", "models": ["w"], "replicas": 1}]})
    assert ray_serve._serve(argparse.Namespace(address=None, num_cpus=None), cfg) == 0
    assert started["controller_options"] == controller_options(), started
