"""`kvsched ray-serve --num-cpus`: what Ray would refuse is refused up front, --dry-run too, one line, exit 2. Found by
review (review68): a fraction (`--num-cpus 0.5`: Ray's "Resource quantities must all be whole numbers") and
--num-cpus while RAY_ADDRESS names a cluster (ray.init joins it, as with --address: "When connecting to an existing
cluster, num_cpus ... must not be provided") passed --dry-run, and a real start met them in ray.init, after the
config was read and a local store started."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray" / "tiny-cpu.yaml"


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(["ray-serve", str(EXAMPLE), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched ray-serve: error:") and err.count("\n") == 1, err
    return err


def test_a_fraction_of_a_cpu_is_refused(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert "--num-cpus must be a whole number" in refused(capsys, ["--num-cpus", "0.5"])
    assert main(["ray-serve", str(EXAMPLE), "--dry-run", "--num-cpus", "2"]) == 0  # 2.0 from the parser: taken


def test_num_cpus_with_ray_address_set_is_refused_naming_it(capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert "cluster at RAY_ADDRESS 10.0.0.7:6379" in refused(capsys, ["--num-cpus", "2"])
    assert main(["ray-serve", str(EXAMPLE), "--dry-run", "--num-cpus", "2", "--address", "local"]) == 0
