"""`kvsched trace import --format mooncake`: sessions from hash chains, output blocks, bad lines, and the committed
slices of the real traces (tests/sim/data/NOTICE.md) through the importer and the simulator."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from kvsched.cli import main
from kvsched.commands.trace import fetch_file
from kvsched.sim.mooncake import BLOCK_SIZE, assign_sessions, convert, full_blocks, parse
from kvsched.sim.trace import Trace

DATA = Path(__file__).parent / "data"
SLICES = sorted(DATA.glob("mooncake_*_slice.jsonl"))


def line(t_ms: int, n: int, m: int, ids: list[int]) -> str:
    return json.dumps({"timestamp": t_ms, "input_length": n, "output_length": m, "hash_ids": ids})


# A: a first turn (2 full blocks + a partial one). B: another user sharing only A's first block (a system prompt).
# C: A's next turn: A's prompt, its 100 output tokens, a new message (it repeats A's full blocks, not the partial one).
# D: B's next turn, which is shorter than B's prompt plus output: B's output blocks cannot be taken from it.
CHAT = [line(0, 1100, 100, [1, 2, 3]), line(1000, 2000, 600, [1, 10, 11, 12]),
        line(5000, 1600, 50, [1, 2, 20, 21]), line(9000, 2100, 10, [1, 10, 11, 13, 30])]


def test_sessions_follow_the_chains_not_a_shared_system_block():
    reqs = list(parse(CHAT))
    assert assign_sessions(reqs) == [0, 1, 0, 1]
    # requiring more than C repeats of A's full blocks (2 of 2) is impossible: 1.0 still links them
    assert assign_sessions(reqs, min_shared=1.0) == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="min_shared"):
        assign_sessions(reqs, min_shared=0.0)


def test_output_blocks_come_from_the_next_turn_when_it_holds_them():
    reqs = list(parse(CHAT))
    blocks = full_blocks(reqs, assign_sessions(reqs))
    assert blocks[0] == [1, 2]  # (1100 + 100) // 512 = 2: the output completes no block
    assert blocks[1] == [1, 10, 11, "out1.3", "out1.4"]  # D (2100 tokens) does not hold B's 2600
    assert blocks[2] == [1, 2, 20]  # C's 1650 tokens: 3 full blocks, the third completed by its output
    assert blocks[3] == [1, 10, 11, 13]
    # A's output completes no block here; give it enough output and C's block 2 is the one it completes, once its
    # KV is computed: not by the last sampled token, which is never fed back (found by review: 436 tokens counted it)
    long_a = list(parse([line(0, 1100, 436, [1, 2, 3]), line(5000, 1600, 50, [1, 2, 20, 21])]))
    assert full_blocks(long_a, [0, 0])[0] == [1, 2]
    longer_a = list(parse([line(0, 1100, 437, [1, 2, 3]), line(5000, 1600, 50, [1, 2, 20, 21])]))
    assert full_blocks(longer_a, [0, 0])[0] == [1, 2, 20]


def test_converted_trace_loads_with_times_in_seconds_and_reuse_filled():
    out = io.StringIO()
    meta = convert(io.StringIO("\n".join(CHAT) + "\n"), out)
    assert meta["sessions"] == 2 and meta["single_turn_sessions"] == 0
    lines = out.getvalue().splitlines()
    header, rows = json.loads(lines[0]), [json.loads(x) for x in lines[1:]]
    assert header["block_size"] == BLOCK_SIZE
    assert [r["t"] for r in rows] == [0.0, 1.0, 5.0, 9.0]
    assert rows[2]["reuse"] == 2 and rows[2]["blocks"] == [20]  # C repeats A's two blocks
    assert rows[3]["reuse"] == 3 and rows[3]["blocks"] == [13]
    assert all("role" not in r and "end" not in r for r in rows)


@pytest.mark.parametrize("bad, message", [
    ('{"timestamp": 0, "input_length": 600}', "lacks field 'hash_ids'"),
    ('{"timestamp": 0, "input_length": 600, "hash_ids": [1]}', "2 hash_ids|1 hash_ids"),
    ('{"timestamp": 0, "input_length": 600, "hash_ids": [1, "x"]}', "list of integers"),
    ('{"timestamp": -5, "input_length": 600, "hash_ids": [1, 2]}', "timestamp"),
    ("not json", "t.jsonl:2"),
])
def test_bad_lines_are_reported_with_their_line_number(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        list(parse([CHAT[0], bad], "t.jsonl"))
    assert "t.jsonl:2" in str(info.value)


@pytest.mark.parametrize("path", SLICES, ids=lambda p: p.stem)
def test_real_slices_convert_and_keep_every_request_and_block(tmp_path, path):
    out = tmp_path / "t.jsonl"
    assert main(["trace", "import", "--format", "mooncake", str(path), str(out)]) == 0
    raw = [json.loads(x) for x in path.read_text().splitlines()]
    trace = Trace.load(out)
    assert len(trace) == len(raw)
    assert int(trace.prompt_tokens.sum()) == sum(r["input_length"] for r in raw)
    assert np.allclose(np.sort(trace.t), np.sort([r["timestamp"] / 1000 for r in raw]))
    # two requests' prompts share exactly the full blocks their Mooncake hash ids share (no id merged or split)
    order = sorted(range(len(raw)), key=lambda j: raw[j]["timestamp"])
    full = [raw[j]["hash_ids"][: raw[j]["input_length"] // BLOCK_SIZE] for j in order]
    for a in range(len(raw)):
        assert len(trace.blocks(a)) >= len(full[a])
        for b in range(a):
            n = min(len(full[a]), len(full[b]))
            same = [x == y for x, y in zip(full[a][:n], full[b][:n], strict=True)]
            assert same == list(trace.blocks(a)[:n] == trace.blocks(b)[:n])
    assert len(trace.sessions) == json.loads(out.read_text().splitlines()[0])["meta"]["sessions"] < len(raw)


def test_real_slice_replays_and_lru_never_beats_opt(tmp_path):
    out, res = tmp_path / "t.jsonl", tmp_path / "r.json"
    assert main(["trace", "import", "--format", "mooncake", str(SLICES[0]), str(out)]) == 0
    assert main(["simulate", str(out), "--pressure", "1.5", "--no-progress", "--out", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["opt"]["tokens_saved"] >= r["lru"]["tokens_saved"] > 0


def test_import_errors_exit_2_with_a_message(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(CHAT[0] + "\n{}\n")
    assert main(["trace", "import", "--format", "mooncake", str(bad), str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["trace", "import", "--format", "mooncake", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2


def test_fetch_checks_the_digest(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text(CHAT[0] + "\n")
    import hashlib

    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    fetch_file(src.as_uri(), tmp_path / "got.jsonl", src.stat().st_size, sha)
    assert (tmp_path / "got.jsonl").read_text() == src.read_text()
    with pytest.raises(ValueError, match="SHA-256"):
        fetch_file(src.as_uri(), tmp_path / "other.jsonl", src.stat().st_size, "0" * 64)
    assert not (tmp_path / "other.jsonl").exists()


def test_fetch_converts_a_file_it_downloads_again_even_beside_a_current_conversion(tmp_path, monkeypatch, capsys):
    """Found by review: a raw file of another digest (a slice put in the cache, a damaged file) was downloaded again,
    but the conversion made from it, of the current converter version, was kept: every later command replayed the
    other file's requests."""
    import hashlib

    import kvsched.commands.trace as trace_cmd

    mirror, cache = tmp_path / "mirror", tmp_path / "cache"
    mirror.mkdir()
    cache.mkdir()
    real = DATA / "mooncake_conversation_slice.jsonl"
    (mirror / "conversation_trace.jsonl").write_bytes(real.read_bytes())
    monkeypatch.setattr(trace_cmd, "MOONCAKE_FILES", {"conversation_trace.jsonl": (
        real.stat().st_size, hashlib.sha256(real.read_bytes()).hexdigest())})
    other = cache / "conversation_trace.jsonl"
    other.write_text("".join(line + "\n" for line in CHAT))
    assert main(["trace", "import", "--format", "mooncake", str(other), str(cache / "conversation.kvsched.jsonl")]) == 0
    assert main(["trace", "fetch", "mooncake", "--dir", str(cache), "--base-url", mirror.as_uri()]) == 0
    assert other.read_bytes() == real.read_bytes()
    assert len(Trace.load(cache / "conversation.kvsched.jsonl")) == sum(1 for line in real.open() if line.strip())
    capsys.readouterr()
    assert main(["trace", "fetch", "mooncake", "--dir", str(cache), "--base-url", mirror.as_uri()]) == 0  # as it is
    assert len(Trace.load(cache / "conversation.kvsched.jsonl")) == sum(1 for line in real.open() if line.strip())


def test_import_never_replaces_a_device_fifo_or_link_with_its_output(tmp_path, capsys):
    """Found by review: OUT=/dev/null (as root) was replaced by a regular file; a FIFO too, and a link was replaced
    instead of written through. A stream (/dev/stdout, a FIFO) is written as a stream."""
    import os
    import threading

    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(CHAT) + "\n")
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    assert main(["trace", "import", "--format", "mooncake", str(src), str(fifo)]) == 0
    reader.join(10)
    assert fifo.is_fifo() and got and got[0].startswith('{"kvsched_trace"')
    from kvsched.bench.plots import save_beside

    drawn: list[object] = []
    assert save_beside(fifo, drawn.append) is None and drawn == []  # no chart beside a stream (f.png, /dev/null.png)
    target = tmp_path / "target.jsonl"
    target.write_text("old")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert main(["trace", "import", "--format", "mooncake", str(src), str(link)]) == 0
    assert link.is_symlink() and Trace.load(target).block_size == BLOCK_SIZE  # written through the link


@pytest.mark.parametrize(("text", "message"), [
    ("", "no requests"), ("\n\n", "no requests"),
    (line(0, 600, 2**40, [0, 1]) + "\n", "output_length must be at most"),  # its output ids took all memory
])
def test_import_refuses_an_empty_file_and_an_absurd_output(tmp_path, capsys, text, message):
    src = tmp_path / "in.jsonl"
    src.write_text(text)
    assert main(["trace", "import", "--format", "mooncake", str(src), str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not (tmp_path / "o.jsonl").exists()


def test_fetch_with_a_malformed_url_is_an_error_and_leaves_no_partial_file(tmp_path, capsys):
    assert main(["trace", "fetch", "mooncake", "--dir", str(tmp_path), "--base-url", "http://localhost:abc/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched trace fetch: error: ") and "Traceback" not in err
    assert not list(tmp_path.glob("*.part"))


def test_an_older_conversion_listing_the_last_tokens_block_is_refused_with_the_converter_named(tmp_path):
    """Converter version 2 listed the block a request's last sampled token completes; the loader refuses it now, and
    says the file needs converting again."""
    path = tmp_path / "old.kvsched.jsonl"
    meta = {"importer": "kvsched trace import --format mooncake", "converter_version": 2}
    path.write_text(json.dumps({"kvsched_trace": 1, "block_size": 512, "meta": meta}) + "\n" + json.dumps(
        {"t": 0, "session": "s0", "prompt_tokens": 1000, "output_tokens": 24, "blocks": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match="last sampled token.*converter version 2, older than 3"):
        Trace.load(path)
