"""`kvsched ray-serve` on a cluster it joined (--address, RAY_ADDRESS, or Ray initialized already) where an application
of its config's name runs: refused (exit 2, a message), not replaced (Serve's `serve.run` updates an application of
that name in place) and then deleted at Ctrl-C. Found by review71."""

from __future__ import annotations

import argparse
import threading
from typing import Any

import pytest


def test_an_application_of_its_name_on_a_joined_cluster_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import ray
    from ray import serve
    from ray.serve.schema import ApplicationStatusOverview, ServeStatus

    from kvsched.adapters.ray.config import parse_config
    from kvsched.commands import ray_serve

    ran: list[Any] = []
    other = ApplicationStatusOverview(status="RUNNING", message="", last_deployed_time_s=0.0, deployments={})
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve, "start", lambda **kw: None)
    monkeypatch.setattr(serve, "status", lambda: ServeStatus(applications={"kvsched": other}))
    monkeypatch.setattr(serve, "run", lambda *a, **kw: ran.append(kw))
    monkeypatch.setattr(serve, "delete", lambda *a, **kw: ran.append(a))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(ray_serve.signal, "signal", lambda *a: None)
    monkeypatch.setattr("kvsched.commands.ray_serve_stop.signal.signal", lambda *a: None)
    monkeypatch.setattr(threading.Event, "wait", lambda self, timeout=None: True)  # (were it served: Ctrl-C at once)
    cfg = parse_config({"pools": [{"name": "w", "model": "/m", "models": ["w"], "replicas": 1}]})
    assert ray_serve._serve(argparse.Namespace(address="ray://head:10001", num_cpus=None), cfg) == 2
    assert ran == []
    assert "already runs an application named 'kvsched'" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "env", "asked"), [(None, None, "local"), ("", None, "local"), (None, "", "local"),
                                                     (None, "auto", "auto"), ("ray://h:1", "auto", "ray://h:1")])
def test_a_local_cluster_is_asked_for_by_name(monkeypatch: pytest.MonkeyPatch, given: str | None, env: str | None,
                                              asked: str) -> None:
    """No address given (--address, RAY_ADDRESS): `ray.init(address="local")`, a cluster of its own. Ray's default,
    None, joins the cluster a `ray start` left on this machine (its address file), which the command then took for
    one it started: at Ctrl-C, Serve shut down on it (every application). Found by review71."""
    import ray

    from kvsched.adapters.ray.config import parse_config
    from kvsched.commands import ray_serve

    asks: list[Any] = []

    def init(**kw: Any) -> None:
        asks.append(kw["address"])
        raise ConnectionError("(stopped here)")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env is not None:
        monkeypatch.setenv("RAY_ADDRESS", env)
    cfg = parse_config({"pools": [{"name": "w", "model": "/m", "models": ["w"], "replicas": 1}]})
    assert ray_serve._serve(argparse.Namespace(address=given, num_cpus=None), cfg) == 2
    assert asks == [asked]
