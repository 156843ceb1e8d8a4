"""`kvsched ray-serve`'s bad inputs found by an operator's walkthrough (review 67): each is one line naming what is
wrong and exit status 2, never a traceback, and nothing of Ray is started for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray" / "tiny-cpu.yaml"


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(["ray-serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched ray-serve:") and "Traceback" not in err and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("content", [b"\xff\xfe\x00 pools: []\n", b"a: " + b"[" * 50_000 + b"]" * 50_000 + b"\n"],
                         ids=["not-utf8", "nested-50000-deep"])
def test_a_config_that_is_no_yaml_text_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   content: bytes) -> None:
    """UnicodeDecodeError and RecursionError were tracebacks."""
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert str(path) in refused(capsys, [str(path), "--dry-run"])


@pytest.mark.parametrize("cpus", ["-1", "nan", "inf"])
def test_num_cpus_must_be_a_finite_count(capsys: pytest.CaptureFixture[str], cpus: str) -> None:
    """Taken with --dry-run, to fail later inside Ray (or not at all)."""
    assert "--num-cpus must be a finite number" in refused(capsys, [str(EXAMPLE), "--dry-run", "--num-cpus", cpus])


def test_num_cpus_with_an_address_is_refused_before_ray_is_asked(capsys: pytest.CaptureFixture[str]) -> None:
    """Ray's "When connecting to an existing cluster, num_cpus and num_gpus must not be provided" was a traceback,
    after the deployments were printed as if about to start."""
    err = refused(capsys, [str(EXAMPLE), "--address", "127.0.0.1:6390", "--num-cpus", "2"])
    assert "--num-cpus sizes the local Ray cluster" in err


def test_a_malformed_address_is_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init's ValueError for an address it cannot parse (raised before it starts or reaches anything)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    if ray.is_initialized():  # another test's cluster in this process: ray-serve would deploy on it
        pytest.skip("Ray is initialised in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["ray-serve", str(EXAMPLE), "--address", "not_an_address"]) == 2
    err = capsys.readouterr().err
    assert "kvsched ray-serve: error: Ray: Invalid address format: not_an_address" in err and "Traceback" not in err
    assert not ray.is_initialized()
