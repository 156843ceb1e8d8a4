"""`kvsched tiny-model` and `kvsched demo` options found wrong by an operator's walkthrough (review 67): `tiny-model
--out DIR` deleted what DIR held, a file or a 20-digit seed was a traceback; the demo started both servers for
options it could not use. Each is now one line with exit status 2, before anything is written or started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvsched.cli import main
from kvsched.commands import demo


def test_tiny_model_out_never_deletes_a_directory_of_other_files(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    assert main(["tiny-model", "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched tiny-model: error:") and "holds files that are not a tiny model" in err
    assert (folder / "notes.txt").read_text() == "mine" and [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_tiny_model_out_builds_into_a_new_or_empty_directory_and_rebuilds_its_own(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tiny-model", "--out", str(empty)]) == 0
    stamp = json.loads((empty / "kvsched-tiny-model.json").read_text())
    assert main(["tiny-model", "--out", str(empty), "--seed", "7"]) == 0  # its own model, another seed: rebuilt
    assert json.loads((empty / "kvsched-tiny-model.json").read_text())["seed"] == 7 != stamp["seed"]
    link = tmp_path / "link"
    link.symlink_to(empty)
    assert main(["tiny-model", "--out", str(link), "--seed", "8"]) == 0  # through a link: its target
    assert json.loads((empty / "kvsched-tiny-model.json").read_text())["seed"] == 8 and link.is_symlink()
    assert main(["tiny-model", "--out", str(tmp_path / "new" / "model")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(tmp_path / "new" / "model")


@pytest.mark.parametrize("argv, message", [
    (["--out", "FILE"], "exists and is not a directory"),
    (["--seed", "99999999999999999999999", "--out", "DIR"], "--seed must be an integer"),
])
def test_tiny_model_bad_out_or_seed_is_one_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    (tmp_path / "FILE").write_text("x")
    argv = [str(tmp_path / a) if a in ("FILE", "DIR") else a for a in argv]
    assert main(["tiny-model", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched tiny-model: error:") and message in err and "Traceback" not in err
    assert not (tmp_path / "DIR").exists()


@pytest.mark.parametrize("argv, message", [
    (["--workflows", "0"], "--workflows must be a positive integer"),
    (["--workflows", "-1"], "--workflows must be a positive integer"),
    (["--workflows", "100000000"], "--workflows must be a positive integer and <= 1000"),
    (["--rounds", "0"], "--rounds must be a positive integer"),
    (["--out", "DIR"], "is a directory"),
    (["--out", "demo.png"], "its chart is written beside it"),
])
def test_demo_refuses_options_it_cannot_use_before_any_server_starts(tmp_path: Path, capsys, monkeypatch,
                                                                     argv: list[str], message: str) -> None:
    def started(*_a: object) -> None:
        raise AssertionError("the demo started its servers")

    monkeypatch.setattr(demo, "run_benchmark", started)
    (tmp_path / "DIR").mkdir()
    argv = [str(tmp_path / a) if a in ("DIR", "demo.png") else a for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "demo.json")]
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched demo: error:") and message in err
