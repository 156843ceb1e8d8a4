"""`kvsched demo --out`: a result path it cannot write is refused before either server starts, as every `kvsched
bench` command's (bench.args.check_out_path). Found by review (review68): the demo checked only for a directory, so an
--out under a file (or in a read-only directory), or one whose chart (.png beside it) is a directory, started both
servers and failed once the ~100 s run was over, a traceback and no result."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main
from kvsched.commands import demo


@pytest.mark.parametrize("out, message", [
    ("FILE/demo.json", "is not a directory"),
    ("CHART/x.json", "its chart's path"),
])
def test_an_out_the_demo_cannot_write_is_refused_before_any_server_starts(tmp_path: Path, capsys, monkeypatch,
                                                                          out: str, message: str) -> None:
    def started(*_a: object) -> None:
        raise AssertionError("the demo started its servers")

    monkeypatch.setattr(demo, "run_benchmark", started)
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "CHART" / "x.png").mkdir(parents=True)
    assert main(["demo", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched demo: error:") and message in err and err.count("\n") == 1, err
