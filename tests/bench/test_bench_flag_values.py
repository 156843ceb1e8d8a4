"""Every `kvsched bench ...` refuses a flag value it cannot use as one `kvsched bench NAME: error:` line with exit
status 2, before any model is built, server, process or Ray cluster started, or measurement run (found by review:
--replicas, --sessions or --turns -1 or 0, --load-factor -1, 0 or nan, --threads -1 and --pressure nan were
tracebacks; --workflows 0 or -1, --rounds 0, --pressure -1 and sched's --steps or --rounds 0 or -1 started servers or
processes). Whatever starts work is replaced by a stand-in that raises `Started`: a refused value never reaches it, a
legal one (however odd) does."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main
from kvsched.sim.mooncake import convert_file

DATA = Path(__file__).parents[1] / "sim" / "data"
BIG = "1" * 23  # a 23-digit integer


class Started(Exception):
    """What a run would have started (servers, processes, fleets, measurements)."""


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch):
    def started(*args, **kwargs):
        raise Started

    for target in ("kvsched.bench.agents.run_benchmark", "kvsched.bench.agents_sweep.run_sweep",
                   "kvsched.bench.compaction.run_benchmark", "kvsched.bench.kernels.run_benchmark",
                   "kvsched.bench.router.run_benchmark", "kvsched.bench.trace_engine.run_benchmark",
                   "kvsched.bench.traces.measure", "kvsched.bench.traces_classes.fit",
                   "kvsched.tiny_model.ensure_tiny_model"):  # (sched's first step: its processes come after)
        monkeypatch.setattr(target, started)


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "syn.jsonl"
    convert_file(DATA / "mooncake_synthetic_slice.jsonl", path)
    return path


def refused(argv: list[str], capsys) -> str:
    try:
        code = main(["bench", *argv])
    except SystemExit as exc:  # argparse's own refusal (text for a number)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and f"kvsched bench {argv[0]}: error: " in err and err.strip().count("\n") == 0, err
    return err


NUMBERS = {
    "agents": [["--workflows", "0"], ["--workflows", "-1"], ["--rounds", "0"], ["--pressure", "-1"],
               ["--pressure", "nan"], ["--pressure", "0"], ["--pressure", "inf"], ["--pressure", "1e400"],
               ["--workers", "0"], ["--worker-turns", "-1"], ["--tool-words", "-1"], ["--brief-words", BIG],
               ["--fp8-tier-gb", "-1"], ["--fp8-tier-gb", "nan"], ["--fidelity-probes", "-1"], ["--seed", BIG],
               ["--workflows", BIG], ["--sweep", "--workflows", "0"]],
    "sched": [["--steps", "0"], ["--steps", "-1"], ["--rounds", "0"], ["--rounds", "-1"], ["--steps", BIG],
              ["--sessions", "0"], ["--sessions", "8", "--sessions", "8"], ["--cpu", "-2"], ["--cpu", BIG]],
    "kernels": [["--threads", "-1"], ["--threads", "0"], ["--threads", BIG]],
    "compaction": [["--sessions", "0"], ["--trigger-tokens", "-1"], ["--summary-tokens", BIG], ["--growth", "nan"],
                   ["--growth", "0"], ["--growth", "1e400"], ["--pressure", "-1"], ["--pressure", "nan"],
                   ["--tool-words", "-1"], ["--seed", BIG], ["--trigger-tokens", "64", "--summary-tokens", "64"],
                   ["--growth", "1000", "--trigger-tokens", "4096"]],
    "router": [["--replicas", "-1"], ["--replicas", "0"], ["--replicas", "8", "0"], ["--replicas", "8", "8"],
               ["--sessions", "-1"], ["--sessions", "0"], ["--turns", "-1"], ["--turns", "0"], ["--turns", BIG],
               ["--load-factor", "-1"], ["--load-factor", "0"], ["--load-factor", "nan"], ["--load-factor", "1"],
               ["--load-factor", "inf"], ["--in-flight-per-replica", "0"], ["--in-flight-per-replica", "nan"],
               ["--seed", BIG], ["--real-sessions", "0"], ["--real-duration", "nan"], ["--real-period", "-1"],
               ["--kill-at", "-1"], ["--migration-only"]],
    "replay": [["--seconds", "inf"], ["--seconds", "1e400"], ["--max-output-tokens", BIG],
               ["--time-scale", "1e9"]],
}


@pytest.mark.parametrize(("bench", "flags"), [(b, f) for b, cases in NUMBERS.items() for f in cases],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_number_it_cannot_use_is_one_error_line_before_anything_starts(bench, flags, trace, capsys, tmp_path):
    argv = [bench, str(trace)] if bench == "replay" else [bench]
    err = refused([*argv, *flags, "--out", str(tmp_path / "r.json")], capsys)
    assert any(f in err for f in flags if f.startswith("--"))


@pytest.mark.parametrize("flags", [["--start-s", "-1"], ["--start-s", "nan"], ["--start-s", "inf"], ["--seconds", "0"],
                                   ["--max-output-tokens", "0"], ["--max-output-tokens", "-1"]])
def test_replay_names_the_flag_it_refuses(flags, trace, capsys):
    """(Refused before, by the window or the plan, in words naming neither flag.)"""
    assert flags[0] in refused(["replay", str(trace), *flags], capsys)


def test_traces_timing_past_reason_is_refused_before_any_replay(trace, capsys):
    refused(["traces", str(trace), "--no-headroom", "--no-tier", "--timing", BIG], capsys)


@pytest.mark.parametrize("bench", ["agents", "sched", "kernels", "compaction", "router", "traces", "replay"])
@pytest.mark.parametrize("out", ["/proc/kvsched-bench.json", "{file}/r.json"])
def test_an_out_it_cannot_write_is_refused_before_anything_starts(bench, out, trace, capsys):
    out = out.format(file=trace)  # under a file: no directory can be made there
    argv = [bench, str(trace)] if bench in ("traces", "replay") else [bench]
    assert "--out" in refused([*argv, "--out", out], capsys)


def test_agents_trace_dir_it_cannot_make_is_refused_before_anything_starts(trace, capsys):
    assert "--trace-dir" in refused(["agents", "--trace-dir", f"{trace}/traces"], capsys)
    assert "--trace-dir" in refused(["agents", "--trace-dir", "/proc/kvsched-traces"], capsys)


@pytest.mark.parametrize(("bench", "flags"), [
    ("agents", ["--workflows", "1", "--rounds", "1", "--pressure", "0.01", "--seed", "-1"]),
    ("agents", ["--sweep", "--workflows", "1", "--trace-dir", "{trace}.d/new"]),
    ("sched", ["--steps", "1", "--rounds", "1", "--sessions", "1", "--cpu", "-1"]),
    ("kernels", ["--threads", "1"]),
    ("compaction", ["--sessions", "1", "--trigger-tokens", "2", "--summary-tokens", "1", "--growth", "0.5"]),
    ("router", ["--replicas", "2", "--sessions", "1", "--turns", "100", "--load-factor", "1.0001"]),
    ("replay", ["{trace}", "--seconds", "1e300", "--start-s", "0", "--max-output-tokens", "1"]),
])
def test_a_legal_odd_value_still_runs(bench, flags, trace, tmp_path):
    with pytest.raises(Started):
        main(["bench", bench, *(f.format(trace=trace) for f in flags), "--out", str(tmp_path / "new" / "r.json")])
