"""Every examples/ray/*.yaml is a config `kvsched ray-serve` takes: it parses (the store section too), survives the
trip to the replicas, and dry-runs; and each shows the router's poll settings at their defaults, so an operator
copying one sees them (found by review: the examples did not show `poll_deadline_s` or `routing_wait_s`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvsched.adapters.ray.config import config_from_dict, load_config
from kvsched.adapters.ray.poll_settings import POLL_DEADLINE_S, RAY_AUTOSCALING_STATS_TIMEOUT_ENV, ROUTING_WAIT_S
from kvsched.adapters.ray.store import read_store_section
from kvsched.cli import main

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "ray").glob("*.yaml"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"tiny-cpu.yaml", "tiny-cpu-store.yaml", "agents-gpu.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_parses_and_dry_runs(path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RAY_AUTOSCALING_STATS_TIMEOUT_ENV, raising=False)
    cfg = load_config(path)
    assert config_from_dict(cfg.to_dict()) == cfg
    cfg.routing()
    read_store_section(path)
    assert main(["ray-serve", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"poll_deadline_s {cfg.router.poll_deadline_s:g}s" in out and "routing_wait_s" in out, out
    assert "(at most Ray's record_autoscaling_stats timeout, 10s here, less 0.5s)" in out, out
    assert "(at most its timeout, 5s, less 0.5s)" in out, out  # every example reports every 2 s


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_shows_the_poll_settings_at_their_defaults(path: Path) -> None:
    router = yaml.safe_load(path.read_text())["router"]
    assert (router.get("poll_deadline_s"), router.get("routing_wait_s")) == (POLL_DEADLINE_S, ROUTING_WAIT_S), router
