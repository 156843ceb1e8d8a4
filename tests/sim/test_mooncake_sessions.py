"""The Mooncake importer's sessions (found by review): no join on a system-prompt block common to unrelated prompts, no
parent that arrived in the same instant, and cached conversions written by an older converter converted again."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from kvsched.sim import mooncake
from kvsched.sim.mooncake import assign_sessions, convert, full_blocks, parse

DATA = Path(__file__).parent / "data"


def line(t_ms: int, n: int, m: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": t_ms, "input_length": n, "output_length": m, "hash_ids": ids})


# Block 1 is a system prompt that 40 unrelated conversations continue (as block 0 of conversation_trace.jsonl starts
# all its prompts); their first prompts end within their second block.
SYSTEM = [line(1000 * i, 600, 10, [1, 100 + i]) for i in range(40)]


def test_a_shared_system_prompt_block_joins_no_session():
    # P's prompt is the system block and part of a second; Q, an unrelated user, shares only the system block, which
    # covers all of P's full blocks: it used to join P's session (conversation_trace: 833 such joins)
    reqs = list(parse([*SYSTEM, line(50_000, 600, 10, [1, 500]), line(51_000, 700, 10, [1, 600])]))
    sessions = assign_sessions(reqs)
    assert len(set(sessions)) == len(reqs)
    assert mooncake.common_prefix_ids(reqs) == {1}


def test_a_turn_that_repeats_more_than_the_system_prompt_still_joins():
    reqs = list(parse([*SYSTEM, line(50_000, 1100, 10, [1, 700, 701]), line(60_000, 1600, 10, [1, 700, 701, 702])]))
    sessions = assign_sessions(reqs)
    assert sessions[-1] == sessions[-2] and len(set(sessions)) == len(reqs) - 1


def test_a_parent_must_arrive_strictly_earlier():
    # A and B arrive in the same second (the trace's timestamps are whole seconds): B cannot carry A's output, so it
    # does not continue A's session, and A's output blocks get ids of their own, not B's (invented from B's prompt).
    # C, a second later, continues B.
    reqs = list(parse([line(1000, 1100, 500, [1, 2, 3]), line(1000, 1600, 10, [1, 2, 5, 6]),
                       line(2000, 2100, 10, [1, 2, 5, 6, 7])]))
    sessions = assign_sessions(reqs)
    assert sessions == [0, 1, 1]
    blocks = full_blocks(reqs, sessions)
    assert blocks[0] == [1, 2, "out0.2"]
    assert blocks[1] == [1, 2, 5]  # 1610 tokens: C repeats B's prompt but not 1610 // 512 = 3 blocks of output
    # a parent a second earlier is one: the same pair a second apart joins, and A's output takes B's block 5
    apart = list(parse([line(1000, 1100, 500, [1, 2, 3]), line(2000, 1600, 10, [1, 2, 5, 6])]))
    assert assign_sessions(apart) == [0, 0]
    assert full_blocks(apart, [0, 0])[0] == [1, 2, 5]


def test_a_conversion_names_its_converter_version():
    out = io.StringIO()
    meta = convert(io.StringIO("\n".join(SYSTEM) + "\n"), out)
    header = json.loads(out.getvalue().splitlines()[0])
    assert header["meta"]["converter_version"] == meta["converter_version"] == mooncake.CONVERTER_VERSION >= 2
    assert meta["common_prefix_blocks"] == 1


def stale_copy(src: Path, dst: Path) -> None:
    """`src`'s conversion as the converter before versions wrote it: no version in the meta."""
    lines = src.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    del header["meta"]["converter_version"]
    dst.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))


def test_a_cached_conversion_by_an_older_converter_is_converted_again(tmp_path, monkeypatch):
    from kvsched.bench.traces import default_traces

    monkeypatch.setenv("KVSCHED_CACHE_DIR", str(tmp_path))
    directory = tmp_path / "traces" / "mooncake"
    directory.mkdir(parents=True)
    raw = directory / "conversation_trace.jsonl"
    raw.write_text((DATA / "mooncake_conversation_slice.jsonl").read_text())
    out = directory / "conversation.kvsched.jsonl"
    mooncake.convert_file(raw, tmp_path / "fresh.jsonl")
    stale_copy(tmp_path / "fresh.jsonl", out)
    assert mooncake.converted_version(out) == 1
    paths = default_traces()  # what `kvsched bench traces` reads without arguments
    assert out in paths and mooncake.converted_version(out) == mooncake.CONVERTER_VERSION
    assert out.read_text() == (tmp_path / "fresh.jsonl").read_text()
    # a current one is left as it is (not rewritten under other readers)
    before = out.stat().st_mtime_ns
    mooncake.current_conversion(raw, out)
    assert out.stat().st_mtime_ns == before
    # the synthetic trace was never fetched here: nothing is made up for it
    assert not (directory / "synthetic.kvsched.jsonl").exists()


def test_a_trace_given_by_path_from_an_older_converter_is_named(tmp_path, capsys):
    from kvsched.cli import main

    fresh, stale = tmp_path / "fresh.jsonl", tmp_path / "stale.jsonl"
    mooncake.convert_file(DATA / "mooncake_conversation_slice.jsonl", fresh)
    stale_copy(fresh, stale)
    for path, warned in ((stale, True), (fresh, False)):
        args = ["bench", "traces", str(path), "--pressure", "3", "--no-headroom", "--no-tier"]
        assert main([*args, "--out", str(tmp_path / "r.json")]) == 0
        err = capsys.readouterr().err
        assert ("converter version 1, older than" in err) is warned, err


@pytest.mark.parametrize("header", ["[1]\n", '"trace"\n', '{"kvsched_trace": 1, "meta": [1]}\n'])
def test_a_cached_conversion_whose_header_is_not_an_object_is_one_error_line(tmp_path, monkeypatch, capsys, header):
    """Found by review: with the fetched file gone, a header that is JSON but no object was an AttributeError."""
    from kvsched.cli import main

    monkeypatch.setenv("KVSCHED_CACHE_DIR", str(tmp_path))
    out = tmp_path / "traces" / "mooncake" / "conversation.kvsched.jsonl"
    out.parent.mkdir(parents=True)
    out.write_text(header)
    with pytest.raises(ValueError, match="not a trace header"):
        mooncake.current_conversion(out.parent / "conversation_trace.jsonl", out)
    assert main(["bench", "traces", "--no-headroom", "--no-tier"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched bench traces: error: ") and err.count("\n") == 1 and "not a trace header" in err
