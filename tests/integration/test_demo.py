"""`make demo`'s command end to end: two real `vllm serve` processes, the real client, a result file and a headline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration


def test_demo_serves_both_sides_and_prints_what_kvsched_changed(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    # one workflow of one round (10 turns a side): the command end to end, not the demo's figures (`make demo`)
    proc = subprocess.run([sys.executable, "-m", "kvsched.cli", "demo", "--workflows", "1", "--rounds", "1",
                           "--no-progress", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "What kvsched changed" in proc.stdout and "Prompt tokens the engine had to compute" in proc.stdout
    assert "FAIL" not in proc.stdout and "PASS" not in proc.stdout  # a demonstration, not a gate run
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert set(result) >= {"stock", "kvsched", "ratio", "config"}
    for side in ("stock", "kvsched"):
        assert result[side]["errors"] == 0 and result[side]["turns"] > 0
        assert result[side]["prefill_tokens_computed"] > 0
    assert result["stock"]["prompt_tokens_total"] == result["kvsched"]["prompt_tokens_total"]  # the same workload
    assert len(result["stock"]["turn_ttfts"]) == len(result["kvsched"]["turn_ttfts"]) == result["stock"]["turns"]
    assert result["config"]["model"]["dtype"] == result["config"]["provenance"]["machine"]["cpu_capabilities"][
        "fastest_dtype"]
