"""`kvsched bench traces` refuses what it cannot use before any replay, as one `error:` line on stderr and exit 2
(found by review: --pressure 0, -1, nan or 1e-6, a --ttl the headroom sides refuse, a malformed trace, a directory, a
header alone, a trace that uses no block twice and an --out naming a directory were tracebacks, some after minutes of
replays)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main
from kvsched.sim.mooncake import convert_file

DATA = Path(__file__).parents[1] / "sim" / "data"


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    path = tmp_path / "syn.jsonl"
    convert_file(DATA / "mooncake_synthetic_slice.jsonl", path)
    return path


@pytest.mark.parametrize("flags", [["--pressure", "0"], ["--pressure", "-1"], ["--pressure", "nan"],
                                   ["--pressure", "1e-300"], ["--pressure", "1e-320"],
                                   ["--pressure", "3", "--pressure", "1e-6"],
                                   ["--pressure", "3", "--pressure", "inf"], ["--ttl", "nan"], ["--ttl", "-5"],
                                   ["--ttl", "inf"], ["--h2d-gbps", "nan"], ["--h2d-gbps", "inf"]])
def test_a_number_it_cannot_use_is_one_error_line(trace, tmp_path, capsys, flags):
    out = tmp_path / "r.json"
    assert main(["bench", "traces", str(trace), "--no-tier", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched bench traces: error: --") and err.count("\n") == 1 and flags[-2] in err
    assert not out.exists()


def test_a_trace_it_cannot_read_is_one_error_line_before_any_replay(trace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kvsched_trace": 1}\n')
    header_only = tmp_path / "empty.jsonl"
    header_only.write_text('{"kvsched_trace": 1, "block_size": 16}\n')
    no_reuse = tmp_path / "no_reuse.jsonl"
    no_reuse.write_text('{"kvsched_trace": 1, "block_size": 16}\n'
                        '{"t": 0, "session": "a", "prompt_tokens": 64, "blocks": ["a", "b", "c", "d"]}\n'
                        '{"t": 1, "session": "b", "prompt_tokens": 64, "blocks": ["e", "f", "g", "h"]}\n')
    for paths, says in (([trace, bad], "first line must be a header"), ([tmp_path], "Is a directory"),
                        ([header_only], "no requests to replay"), ([no_reuse], "no block is used twice")):
        assert main(["bench", "traces", *map(str, paths), "--no-headroom", "--no-tier"]) == 2
        captured = capsys.readouterr()
        assert says in captured.err and captured.err.count("\n") == 1
        assert "live pressure" not in captured.out  # nothing was replayed


def test_an_out_it_cannot_write_is_refused_before_any_replay(trace, tmp_path, capsys):
    for out, says in ((tmp_path, "is a directory"), (trace, "would overwrite the input")):
        assert main(["bench", "traces", str(trace), "--no-headroom", "--no-tier", "--out", str(out)]) == 2
        captured = capsys.readouterr()
        assert says in captured.err and "live pressure" not in captured.out


def test_a_cached_trace_it_cannot_convert_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVSCHED_CACHE_DIR", str(tmp_path))
    raw = tmp_path / "traces" / "mooncake" / "conversation_trace.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_text('{"timestamp": 0}\n')
    assert main(["bench", "traces", "--no-headroom", "--no-tier"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched bench traces: error: ") and "lacks field 'hash_ids'" in err


def test_two_traces_of_one_file_name_are_refused(trace, tmp_path, capsys):
    """Found by review: the JSON keys traces by file name, so a/syn.jsonl and b/syn.jsonl left one entry for two."""
    other = tmp_path / "b" / trace.name
    other.parent.mkdir()
    other.write_bytes(trace.read_bytes())
    out = tmp_path / "r.json"
    assert main(["bench", "traces", str(trace), str(other), "--no-headroom", "--no-tier", "--pressure", "3",
                 "--out", str(out)]) == 2
    assert "share a file name" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize(("flags", "says"), [
    (["--no-tier", "--tier-eviction", "value"], "--tier-eviction only applies to the tier sides"),
    (["--no-tier", "--h2d-gbps", "8", "--tier-eviction", "recency"], "--h2d-gbps and --tier-eviction only apply to"),
    (["--no-headroom", "--no-tier", "--ttl", "120"], "--ttl only applies to the headroom sides"),
    (["--no-headroom", "--no-tier", "--pressure", "3", "--pressure", "3.0"], "--pressure names one value twice")])
def test_an_option_it_would_ignore_or_overwrite_is_one_error_line(trace, tmp_path, capsys, flags, says):
    """Found by review: the tier's options with --no-tier and --ttl with --no-headroom changed nothing, silently, and a
    repeated --pressure value replayed twice into one JSON entry."""
    out = tmp_path / "r.json"
    assert main(["bench", "traces", str(trace), *flags, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("kvsched bench traces: error: ") and captured.err.count("\n") == 1
    assert says in captured.err and "live pressure" not in captured.out and not out.exists()
