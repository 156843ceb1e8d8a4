"""`kvsched ray-serve --num-cpus` against the pools' replicas (review69): fewer CPUs than they ask at start is refused
up front, --dry-run too, one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main
from tests.ray.test_ray_serve_num_cpus import EXAMPLE


def test_num_cpus_fewer_than_the_pools_replicas_ask_is_refused(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """Found by review69: `--num-cpus 1` beside 2 replicas asking 1 CPU each passed --dry-run, then Ray Serve waited
    for the second replica's CPU for ever (serve.run never returned)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tmp_path / "pools.yaml"
    config.write_text(EXAMPLE.read_text().replace("num_cpus: 0 ", "num_cpus: 1 "))
    assert main(["ray-serve", str(config), "--dry-run", "--num-cpus", "2"]) == 0  # 2 x 1: fits
    capsys.readouterr()
    assert main(["ray-serve", str(config), "--dry-run", "--num-cpus", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched ray-serve: error: --num-cpus 1 is fewer CPUs than the pools' replicas ask at "
                          "start, 2 (replicas x num_cpus: ") and err.count("\n") == 1, err
    assert main(["ray-serve", str(EXAMPLE), "--dry-run", "--num-cpus", "0"]) == 0  # pools asking no CPU
