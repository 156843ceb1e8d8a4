"""`make demo`'s command end to end: two real `vllm serve` processes, the real client, a result file and a headline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration import early
from tests.integration.procs import Finished, collect, start_together

pytest.importorskip("vllm")
pytestmark = pytest.mark.integration


@pytest.fixture
def demo_run(tmp_path: Path) -> tuple[Finished, Path]:
    """`early.demo_argv` run to its end: spawned when the session started (early.py), else now; its exit code and
    output, and its result file."""
    spawned = early.take("demo")
    if spawned is None:
        out = tmp_path / "demo.json"
        spawned = (start_together([early.demo_argv(out)]), out)
    started, out = spawned
    try:
        started.procs[0].wait(timeout=900)
    except BaseException:  # its servers stopped too
        early.interrupt(started)
        raise
    return collect(started)[0], out


def test_demo_serves_both_sides_and_prints_what_kvsched_changed(demo_run: tuple[Finished, Path]) -> None:
    proc, out = demo_run
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
