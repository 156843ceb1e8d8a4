"""Malformed trace files, Mooncake imports and `kvsched simulate` options are one-line errors (exit 2), never a
traceback or a silently accepted NaN, negative or absurd value."""

from __future__ import annotations

import json

import pytest

from kvsched.cli import main
from kvsched.sim.trace import Trace

HEADER = '{"kvsched_trace": 1, "block_size": 16}\n'
OK = '{"t": 0, "session": "a", "prompt_tokens": 32, "output_tokens": 4, "blocks": ["x", "y"]}\n'


@pytest.mark.parametrize(("text", "where", "field"), [
    ("[1]\n", "", "header"),
    ('{"kvsched_trace": 1, "block_size": 0}\n' + OK, ":1", "block_size"),
    ('{"kvsched_trace": 1, "block_size": "abc"}\n', ":1", "block_size"),
    ('{"kvsched_trace": 1, "block_size": 16, "meta": [1]}\n' + OK, ":1", "meta"),
    (HEADER + "[1, 2]\n", ":2", "JSON object"),
    (HEADER + OK.replace("32", "1e400"), ":2", "prompt_tokens"),
    (HEADER + OK.replace("32", "-16"), ":2", "prompt_tokens"),
    (HEADER + OK.replace('["x", "y"]', "[[1]]"), ":2", "blocks"),
    (HEADER + OK.replace('["x", "y"]', "null"), ":2", "blocks"),
    (HEADER + OK.replace('"x", "y"]', '"x", "y"], "salt": [1]'), ":2", "salt"),
    (HEADER + OK.replace('"t": 0', '"t": NaN'), ":2", "t must"),
    (HEADER + OK.replace('"y"]', '"y"], "ttl_s": -5'), ":2", "ttl_s"),
    (HEADER + OK.replace('"y"]', '"y"], "duration_s": Infinity'), ":2", "duration_s"),
    (HEADER + OK.replace('"y"]', '"y"], "role": ["x"]'), ":2", "role"),
    (HEADER + OK.replace('"y"]', '"y"], "end": "no"'), ":2", "end"),
    # a recording's header sizes the replay: a bool was a pool of one block, inf or a fraction a traceback (review)
    ('{"kvsched_trace": 1, "block_size": 16, "meta": {"capacity_blocks": true}}\n' + OK, ":1", "capacity_blocks"),
    ('{"kvsched_trace": 1, "block_size": 16, "meta": {"capacity_blocks": -4}}\n' + OK, ":1", "capacity_blocks"),
    ('{"kvsched_trace": 1, "block_size": 16, "meta": {"kv_bytes_per_token": Infinity}}\n' + OK, ":1",
     "kv_bytes_per_token"),
    ('{"kvsched_trace": 1, "block_size": 16, "meta": {"kv_bytes_per_token": 0.1, "fp8_tier_block_bytes": 0.5}}\n'
     + OK, ":1", "kv_bytes_per_token"),
])
def test_a_malformed_trace_is_an_error_naming_its_line_and_field(tmp_path, capsys, text, where, field):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=field):
        Trace.load(path)
    for argv in (["trace", "stats", str(path)], ["simulate", str(path), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"t.jsonl{where}" in err and field in err and "Traceback" not in err


def mooncake(tmp_path, *rows):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def row(t, n, ids, m=1):
    return {"timestamp": t, "input_length": n, "output_length": m, "hash_ids": ids}


def test_import_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = mooncake(tmp_path, row(0, 600, [1, 2]))
    before = src.read_text()
    assert main(["trace", "import", "--format", "mooncake", str(src), str(src)]) == 2
    assert "overwrite the input" in capsys.readouterr().err and src.read_text() == before
    out = tmp_path / "o.jsonl"
    out.write_text("old")
    assert main(["trace", "import", "--format", "mooncake", str(mooncake(tmp_path, {"x": 1})), str(out)]) == 2
    assert out.read_text() == "old"  # a failed import leaves OUT as it was
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


@pytest.mark.parametrize(("args", "rows", "message"), [
    (["--min-shared", "0"], [row(0, 600, [1, 2])], "--min-shared"),
    (["--min-shared", "nan"], [row(0, 600, [1, 2])], "--min-shared"),
    ([], [{"timestamp": 0, "input_length": 1e400, "output_length": 1, "hash_ids": [1]}], "input_length"),
    ([], [row(0, 600, [1, 2], m=float("inf"))], "output_length"),
    ([], [row(0, 600, [1, 1])], "chained"),  # an id at two positions in one request
    ([], [row(0, 600, [1, 2]), row(1, 600, [2, 3])], "mc.jsonl:2: hash id 2"),  # ... or across requests
    ([], [row(0, 600, [True, 2])], "list of integers"),
])
def test_import_refuses_bad_options_and_unchained_ids(tmp_path, capsys, args, rows, message):
    argv = ["trace", "import", "--format", "mooncake", *args, str(mooncake(tmp_path, *rows)), str(tmp_path / "o")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--prefill-tok-s", "0"], ["--prefill-tok-s", "nan"], ["--prefill-tok-s", "-5"], ["--pressure", "nan"],
    ["--host-gib-per-gpu", "1e300"], ["--gpu-kv-gib", "1e-300", "--host-gib-per-gpu", "10"],
    ["--fp8-tier-blocks", "100000000000000000000"], ["--fp8-tier-gib", "1e6"], ["--h2d-gbps", "inf"],
    ["--capacity-blocks", "1" + "0" * 300],
])
def test_simulate_refuses_absurd_options(tmp_path, capsys, argv):
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER + OK)
    assert main(["simulate", str(path), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched simulate: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert argv[0] in err or "FP8 tier" in err  # names the option (or the tier it sized)


def test_simulate_refuses_negative_workflows_and_a_directory_as_out(tmp_path, capsys):
    assert main(["simulate", "--generate", "--quick", "--workflows", "-3", "--no-progress"]) == 2
    assert "--workflows" in capsys.readouterr().err
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER + OK)
    assert main(["simulate", str(path), "--no-progress", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["simulate", str(path), "--no-progress", "--out", str(path / "x.json")]) == 2  # not a directory
    assert "kvsched simulate: error:" in capsys.readouterr().err


def test_a_file_without_line_ends_is_an_error_not_all_memory(tmp_path, capsys, monkeypatch):
    """/dev/zero, a binary file or one huge JSON document: read in bounded lines (found by review: MemoryError)."""
    from kvsched.sim import trace_fields

    monkeypatch.setattr(trace_fields, "MAX_LINE_CHARS", 1000)
    blob = tmp_path / "blob.jsonl"
    blob.write_text("x" * 5000)
    assert main(["simulate", str(blob), "--no-progress"]) == 2
    assert "a line longer than" in capsys.readouterr().err
    long_request = tmp_path / "long.jsonl"
    long_request.write_text(HEADER + OK.replace('"a"', '"' + "a" * 2000 + '"'))
    assert main(["simulate", str(long_request), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{long_request}:2: a line longer than" in err and "Traceback" not in err
    assert main(["trace", "import", "--format", "mooncake", str(blob), str(tmp_path / "o.jsonl")]) == 2
    assert "a line longer than" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "named"), [
    (["--compaction", "summarize", "--compaction-summary-tokens", "10000000"], "--compaction-summary-tokens"),
    (["--compaction", "summarize", "--compaction-summary-tokens", "6000"], "smaller than"),
    (["--compaction", "summarize", "--system-tokens", "100000000"], "--system-tokens"),
    (["--replicas", "100000"], "--replicas"),
])
def test_simulate_refuses_compaction_and_replica_counts_past_their_limits(capsys, argv, named):
    """Found by review: a 10M-token summary took all memory, 100,000 replicas never finished building their ring."""
    assert main(["simulate", "--generate", "--quick", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched simulate: error: ") and named in err and "Traceback" not in err


def test_a_system_prompt_longer_than_a_prompt_is_not_blamed_on_the_trace(capsys):
    assert main(["simulate", "--generate", "--quick", "--no-progress", "--compaction", "summarize",
                 "--system-tokens", "100000", "--policies", "lru"]) == 0


def test_simulate_warns_of_a_misspelt_setting(capsys, monkeypatch, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER + OK)
    monkeypatch.setenv("KVSCHED_DEFALT_TTL_S", "600")
    monkeypatch.setenv("KVSCHED_TRACE", "/tmp/x")  # the engine's, not the simulator's: not a misspelling
    assert main(["simulate", str(path), "--no-progress", "--policies", "lru", "--pressure", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "KVSCHED_DEFALT_TTL_S is not a kvsched setting and is ignored; did you mean KVSCHED_DEFAULT_TTL_S?" in err
    assert "KVSCHED_TRACE " not in err


def test_simulate_refuses_a_trace_with_no_requests(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER)
    assert main(["simulate", str(path), "--no-progress"]) == 2
    assert "no requests to replay" in capsys.readouterr().err


# ---- found by review (stop 44) ---------------------------------------------------------------------------------------
def test_an_id_twice_in_one_requests_new_blocks_is_refused(tmp_path, capsys):
    """It crashed the replay (IndexError in the evictors) or counted one block held twice."""
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER + OK.replace('["x", "y"]', '["x", "x"]'))
    assert main(["simulate", str(path), "--no-progress"]) == 2
    assert "two positions" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--out", "{trace}"], "overwrite the input"),
    (["--out", "{tmp}/r.png"], "JSON result"),
    (["--write-trace", "{tmp}/w.jsonl"], "--write-trace only applies with --generate"),
    (["--seed", "3"], "--seed only applies with --generate"),
    (["--seed", "3", "--quick"], "--quick, --seed only apply with --generate"),
    (["--policies", "lru,lru"], "twice"),
    (["--pressure", "100"], "every request is larger than the pool"),
])
def test_simulate_refuses_outputs_over_its_input_and_options_that_do_nothing(tmp_path, capsys, argv, message):
    path = tmp_path / "t.jsonl"
    path.write_text(HEADER + OK)
    before = path.read_text()
    argv = [a.format(trace=path, tmp=tmp_path) for a in argv]
    assert main(["simulate", str(path), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err and path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # nothing written


def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path, monkeypatch):
    from kvsched.bench.common import write_json

    out = tmp_path / "r.json"
    out.write_text("old")

    class Unserializable:
        def __str__(self) -> str:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_json(out, {"a": list(range(1000)), "b": Unserializable()})
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_import_to_a_symlink_loop_is_an_error_not_a_traceback(tmp_path, capsys):
    loop = tmp_path / "loop.out"
    loop.symlink_to(loop)
    assert main(["trace", "import", "--format", "mooncake", str(mooncake(tmp_path, row(0, 600, [1, 2]))),
                 str(loop)]) == 2
    err = capsys.readouterr().err
    assert "loop.out" in err and "Traceback" not in err


def test_a_trace_that_is_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_bytes((HEADER + OK).encode() + b'{"t": 1, "session": "\xff"}\n')
    for argv in (["trace", "stats", str(path)], ["simulate", str(path), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "t.jsonl:" in err and "not UTF-8" in err and "Traceback" not in err


def test_an_output_keeps_its_permissions_and_a_long_name_works(tmp_path):
    """Found by review: the rename left 0644 where the file was 0600; `.{a 250-character name}.part` was too long for
    the file system. (A stream, /dev/stdout or a FIFO, is written as one: test_mooncake_import.py.)"""
    import stat

    from kvsched.bench.common import write_json

    out = tmp_path / "r.json"
    out.write_text("old")
    out.chmod(0o600)
    write_json(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1} and stat.S_IMODE(out.stat().st_mode) == 0o600
    long = tmp_path / ("x" * 250 + ".json")
    write_json(long, {"b": 2})
    assert json.loads(long.read_text()) == {"b": 2} and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["r.json", long.name])


def test_a_pool_only_the_compaction_side_fits_is_replayed(tmp_path, capsys):
    """Found by review: the every-request-rejected error fired while the compaction side had replayed the session."""
    lines, have = [HEADER], 0
    for turn in range(6):
        prompt = 10_000 + 200 * turn
        n = prompt // 16
        lines.append(json.dumps({"t": turn, "session": "a", "prompt_tokens": prompt, "output_tokens": 0, "reuse": have,
                                 "blocks": [f"b{i}" for i in range(have, n)]}) + "\n")
        have = n
    path = tmp_path / "big.jsonl"
    path.write_text("".join(lines))
    out = tmp_path / "r.json"
    argv = ["simulate", str(path), "--no-progress", "--capacity-blocks", "100", "--policies", "lru", "--out", str(out)]
    assert main(argv) == 2 and "every request" in capsys.readouterr().err
    assert main([*argv, "--compaction", "sliding_window", "--compaction-keep-recent", "1", "--system-tokens", "0"]) == 0
    result = json.loads(out.read_text())
    assert result["lru"]["requests"] == 0 and result["kvsched+compaction"]["requests"] > 0
