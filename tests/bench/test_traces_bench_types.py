"""`kvsched bench traces` with a non-default `--ttl`: found by the compiled-types audit's flag sweep (not a compiled
module's check: pure mode failed the same way)."""

from __future__ import annotations

import json
from pathlib import Path

from kvsched.cli import main
from kvsched.sim.mooncake import convert_file

DATA = Path(__file__).parents[1] / "sim" / "data"


def test_a_ttl_no_turn_returns_within_reports_no_auc_instead_of_a_traceback(tmp_path, capsys):
    """`--ttl 1.5`: no turn of the slice returns within 1.5 s, so the return classes' AUC is undefined (None). The
    summary line formatted it with `:.3f`: TypeError ("unsupported format string passed to NoneType.__format__"),
    exit 1 before any side ran."""
    trace = tmp_path / "conv.jsonl"
    convert_file(DATA / "mooncake_conversation_slice.jsonl", trace)
    out = tmp_path / "r.json"
    assert main(["bench", "traces", str(trace), "--ttl", "1.5", "--pressure", "3", "--no-tier", "--out", str(out)]) == 0
    assert "AUC n/a" in capsys.readouterr().out
    result = json.loads(out.read_text())["traces"]["conv.jsonl"]
    assert result["return_classes"]["auc"] is None and result["pressures"]["3"]["share_of_opt_saving"]["opt"] == 1.0
