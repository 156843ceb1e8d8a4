"""`kvsched ray-serve --num-cpus` against the replicas Ray starts, counted as Ray counts (review70): a pool that fits
was refused when the float sum of its CPUs came out a hair above the whole number (10 x 1.1 = 11.000000000000002),
or when an autoscaling pool's `replicas` is above its max_replicas (Ray starts max_replicas of them); one that does not
fit passed when its `replicas` is below its min_replicas (Ray starts min_replicas of them, and waits for ever)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main
from tests.ray.test_ray_serve_num_cpus import EXAMPLE


def pools(tmp_path: Path, num_cpus: str, replicas: str) -> Path:
    config = tmp_path / "pools.yaml"
    config.write_text(EXAMPLE.read_text().replace("num_cpus: 0 ", f"num_cpus: {num_cpus} ")
                      .replace("    replicas: 2", replicas))
    return config


@pytest.mark.parametrize(("num_cpus", "replicas", "need", "fits", "short"), [
    ("1.1", "    replicas: 10", "11", "11", "10"),
    ("1", "    replicas: 4\n    autoscaling: {min_replicas: 1, max_replicas: 2}", "2", "2", "1"),
    # replicas 0 below min_replicas 3: Ray starts 3 (before, 0 were counted and --num-cpus 1 passed)
    ("0.5", "    replicas: 0\n    autoscaling: {min_replicas: 3, max_replicas: 4}", "1.5", "2", "1"),
])
def test_num_cpus_the_started_replicas_fit_in_is_taken_and_one_less_refused(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, num_cpus: str,
        replicas: str, need: str, fits: str, short: str) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = pools(tmp_path, num_cpus, replicas)
    assert main(["ray-serve", str(config), "--dry-run", "--num-cpus", fits]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["ray-serve", str(config), "--dry-run", "--num-cpus", short]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kvsched ray-serve: error: --num-cpus {short} is fewer CPUs than the pools' replicas ask "
                          f"at start, {need} (replicas x num_cpus: "), err


def test_start_replicas_is_what_the_deployment_asks(tmp_path: Path) -> None:
    """The count the check uses is the one `engine_options` deploys (num_replicas, or autoscaling's
    initial_replicas), for pools below, within and above their autoscaling range."""
    from kvsched.adapters.ray.app import engine_options
    from kvsched.adapters.ray.config import load_config
    from kvsched.commands.ray_serve import start_replicas

    for replicas in ("    replicas: 3", "    replicas: 0\n    autoscaling: {min_replicas: 2, max_replicas: 4}",
                     "    replicas: 3\n    autoscaling: {min_replicas: 2, max_replicas: 4}",
                     "    replicas: 9\n    autoscaling: {min_replicas: 2, max_replicas: 4}",
                     "    autoscaling: {min_replicas: 0, max_replicas: 4}"):
        cfg = load_config(pools(tmp_path, "1", replicas))
        (pool,) = cfg.pools
        opts = engine_options(pool, cfg)
        deployed = opts["num_replicas"] if "num_replicas" in opts else opts["autoscaling_config"].initial_replicas
        assert start_replicas(pool) == deployed, replicas


@pytest.mark.parametrize(("example", "old", "new"), [
    (EXAMPLE, "num_cpus: 0 ", "num_cpus: 0.00004 "),
    (EXAMPLE.with_name("agents-gpu.yaml"), "num_gpus: 2", "num_gpus: 0.00009"),
])
def test_a_quantity_below_rays_smallest_is_refused_at_the_dry_run(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, example: Path, old: str,
        new: str) -> None:
    """Ray refuses a resource quantity between 0 and 0.0001 when it deploys (found by review71: --dry-run passed)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tmp_path / "pools.yaml"
    assert old in (text := example.read_text())
    config.write_text(text.replace(old, new, 1))
    assert main(["ray-serve", str(config), "--dry-run"]) == 2
    name, value = new.split(": ")
    assert f"{name} {float(value):g} is below Ray's smallest quantity, 0.0001" in capsys.readouterr().err
