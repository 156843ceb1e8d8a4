"""`kvsched bench agents` ends on its gates' verdict: a failed gate is its exit code (1) and its last line, and a gate
that does not apply at the run's size is `not applicable (why)` in the JSON and the output, neither PASS nor FAIL.
The tier side's three gates compare it with stock-same-memory, whose pool (3x kvsched's) holds the whole working set
at --quick's 1.5x pressure: there they do not apply. Read from the committed quick run
(benchmarks/results/agents_quick_same_memory.json: the gates re-evaluated, no server started). Found by leftovers70:
that run printed three [FAIL] lines and exited 0."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from kvsched.bench import agents
from kvsched.bench.agents_report import gates, gates_not_applicable, verdict
from kvsched.cli import build_parser

QUICK_RUN = Path(__file__).resolve().parents[2] / "benchmarks/results/agents_quick_same_memory.json"
TIER_GATES = ("prefill_le_0.45x_stock_same_memory", "followup_ttft_p95_le_0.3x_stock_same_memory",
              "throughput_ge_1.2x_stock_same_memory")


def quick_run(**config: Any) -> dict[str, Any]:
    result = json.loads(QUICK_RUN.read_text())
    for key in ("gates", "gates_not_applicable"):
        result.pop(key, None)
    result["config"].update(config)
    return result


def evaluated(result: dict[str, Any]) -> dict[str, Any]:
    result["gates"] = gates(result)
    result["gates_not_applicable"] = gates_not_applicable(result)
    return result


def test_the_quick_runs_tier_gates_do_not_apply_and_say_why() -> None:
    r = evaluated(quick_run())
    assert r["config"]["same_memory_num_blocks"] * 32 >= r["config"]["unbounded_pool_tokens"]  # 22,400 >= 14,048
    assert set(r["gates_not_applicable"]) == set(TIER_GATES) and not set(TIER_GATES) & set(r["gates"])
    for why in r["gates_not_applicable"].values():
        assert why.startswith("not applicable (stock-same-memory's pool of 22,400 tokens holds the whole working set")
    assert r["gates"] == {"zero_errors": True, "every_side_valid": True, "half_of_restores_prefetched": True,
                          "no_tier_prefill_le_stock": True}
    assert verdict(r) == (0, "gates: all 4 passed, 3 not applicable")


def test_where_the_base_falls_short_they_apply_and_a_failure_is_the_exit_code() -> None:
    r = evaluated(quick_run(same_memory_num_blocks=351))  # 11,232 tokens: below the unbounded side's 14,048
    assert r["gates_not_applicable"] == {} and not any(r["gates"][g] for g in TIER_GATES)
    code, line = verdict(r)
    assert code == 1 and line.startswith("gates: FAILED 3 of 7 (prefill_le_0.45x_stock_same_memory, ")


@pytest.mark.parametrize(("config", "code", "last"), [({}, 0, "gates: all 4 passed, 3 not applicable"),
                                                      ({"same_memory_num_blocks": 351}, 1, "gates: FAILED 3 of 7")])
def test_the_command_ends_on_the_verdict(config: dict[str, Any], code: int, last: str, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    result = quick_run(**config)

    def measured(args: Any) -> dict[str, Any]:  # the run's measurements; the command evaluates the gates as it does
        return evaluated(copy.deepcopy(result))

    monkeypatch.setattr(agents, "run_benchmark", measured)
    monkeypatch.setattr(agents, "save_beside", lambda *a, **kw: None)
    out = tmp_path / "quick.json"
    args = build_parser().parse_args(["bench", "agents", "--quick", "--no-progress", "--out", str(out)])
    assert agents.run(args) == code
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith(last)
    written = json.loads(out.read_text())
    if code == 0:
        assert "[FAIL]" not in "\n".join(lines) and sum("[N/A]" in line for line in lines) == 3
        assert set(written["gates_not_applicable"]) == set(TIER_GATES)
    else:
        assert sum("[FAIL]" in line for line in lines) == 3 and written["gates_not_applicable"] == {}
