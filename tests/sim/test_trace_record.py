"""Recording finished requests as a trace: what the replay reads back is what the engine served, block for block,
whatever order the requests finished in; nothing written names a session, salt or block as the engine did."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from kvsched.sim.trace import Trace
from kvsched.sim.trace_record import ENTRY_OVERHEAD, MAX_KEPT_BLOCKS, Finished, TraceRecording

BS = 4


def blocks(session: str, n: int) -> list[bytes]:
    """Chained raw hashes as an engine has them: a session's turns share their leading blocks."""
    return [f"{session}:{i}".encode() for i in range(n)]


def load(buf: io.StringIO, tmp_path: Path) -> Trace:
    path = tmp_path / "rec.jsonl"
    path.write_text(buf.getvalue())
    return Trace.load(path)


def replayed_blocks(trace: Trace) -> dict[tuple[str, float], list[int]]:
    """(session, t) -> the request's full block list as the replay rebuilds it (dense ids)."""
    return {(trace.sessions[int(trace.session[i])][0], float(trace.t[i])): list(trace.blocks(i))
            for i in range(len(trace.t))}


def test_in_order_turns_are_written_as_deltas_and_read_back_whole(tmp_path):
    buf = io.StringIO()
    rec = TraceRecording(buf, BS, {"source": "test"})
    for i, n in enumerate((3, 5, 8)):  # each turn extends the session's prompt
        rec.arrived(f"r{i}", 10.0 + i, "agent-7", "salt-secret")
        rec.finished(f"r{i}", 10.5 + i, Finished(n * BS, 2, blocks("agent-7", n), role="worker"))
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["kvsched_trace"] == 1 and lines[0]["block_size"] == BS and lines[0]["meta"]["anonymized"]
    assert [x.get("reuse", 0) for x in lines[1:]] == [0, 3, 5]
    assert [len(x["blocks"]) for x in lines[1:]] == [3, 2, 3]
    assert [x["t"] for x in lines[1:]] == [0.0, 1.0, 2.0] and all(x["duration_s"] == 0.5 for x in lines[1:])
    trace = load(buf, tmp_path)
    rebuilt = list(replayed_blocks(trace).values())
    assert [len(b) for b in rebuilt] == [3, 5, 8] and rebuilt[2][:5] == rebuilt[1] and rebuilt[1][:3] == rebuilt[0]


def test_out_of_order_finishes_replay_exactly_the_blocks_each_request_had(tmp_path):
    """Random overlapping turns of a few sessions, finished in random order: the replay (which resolves `reuse` by
    arrival) rebuilds every request's exact block list."""
    rng = random.Random(3)
    buf = io.StringIO()
    rec = TraceRecording(buf, BS)
    truth: dict[str, list[bytes]] = {}
    sent: dict[str, tuple[str, float, list[bytes]]] = {}
    now = 0.0
    running: list[str] = []
    for i in range(400):
        now += 0.01
        if running and rng.random() < 0.5:
            rid = running.pop(rng.randrange(len(running)))
            _, _, b = sent[rid]
            rec.finished(rid, now, Finished(len(b) * BS, 1, b))
            continue
        sid = f"s{rng.randrange(5)}"
        history = truth.setdefault(sid, [])
        if rng.random() < 0.2 and history:  # a side request: a shorter prefix of the session
            b = history[:rng.randrange(1, len(history) + 1)]
        else:
            history.extend(f"{sid}:{i}:{k}".encode() for k in range(rng.randint(1, 3)))
            b = list(history)
        rid = f"r{i}"
        sent[rid] = (sid, now, b)
        rec.arrived(rid, now, sid, None)
        running.append(rid)
    for rid in running:
        rec.finished(rid, now + 1, Finished(len(sent[rid][2]) * BS, 1, sent[rid][2]))
    trace = load(buf, tmp_path)
    assert len(trace.t) == len(sent) == rec.written
    lines = [json.loads(x) for x in buf.getvalue().splitlines()[1:]]
    assert any(x.get("reuse", 0) for x in lines) and any(not x.get("reuse", 0) for x in lines[5:])
    # the same raw blocks must be the same dense ids everywhere: compare the rebuilt lists through a raw -> id map
    raw_of: dict[int, bytes] = {}
    t0 = min(t for _, t, _ in sent.values())
    by_t = {round(t - t0, 4): (sid, b) for sid, t, b in sent.values()}  # arrivals are 0.01 apart
    for i in range(len(trace.t)):
        sid, raw = by_t[round(float(trace.t[i]), 4)]
        ids = list(trace.blocks(i))
        assert len(ids) == len(raw), sid
        for dense, r in zip(ids, raw, strict=True):
            assert raw_of.setdefault(dense, r) == r


def test_nothing_the_engine_named_is_written_and_keys_differ_per_recording(tmp_path):
    outs = []
    for _ in range(2):
        buf = io.StringIO()
        rec = TraceRecording(buf, BS)
        rec.arrived("req-1", 0.0, ("user@example.com", "tenant-x"), "salt-secret")
        rec.finished("req-1", 1.0, Finished(2 * BS, 1, [b"raw-hash-0", b"raw-hash-1"], end=True))
        rec.arrived("req-2", 2.0, None, None)  # no session: a session of its own
        rec.finished("req-2", 3.0, Finished(BS, 0, [b"raw-hash-0"]))
        outs.append(buf.getvalue())
    for text in outs:
        for secret in ("user@example.com", "tenant-x", "salt-secret", "raw-hash", "req-1", "req-2"):
            assert secret not in text
    a, b = ([json.loads(x) for x in text.splitlines()[1:]] for text in outs)
    assert a[0]["blocks"][0] == a[1]["blocks"][0]  # one recording: the same block, the same id
    assert a[0]["blocks"] != b[0]["blocks"] and a[0]["session"] != b[0]["session"]  # another: other ids
    assert a[0]["end"] is True and a[0]["session"] != a[1]["session"]


def test_a_finish_without_its_arrival_is_left_out_and_the_ids_kept_are_bounded():
    buf = io.StringIO()
    per_session = 2 + ENTRY_OVERHEAD
    rec = TraceRecording(buf, BS, max_kept_blocks=3 * per_session + 1)
    assert not rec.finished("never-arrived", 1.0, Finished(BS, 1, [b"x"]))
    for i in range(5):  # 2 blocks a session: three sessions' entries fit, the oldest are forgotten
        rec.arrived(f"r{i}", float(i), f"s{i}", None)
        rec.finished(f"r{i}", float(i) + 0.1, Finished(2 * BS, 1, [f"s{i}".encode(), f"s{i}+".encode()]))
    assert rec.written == 5 and list(rec._last) == [rec.token(("session", f"s{i}")) for i in (2, 3, 4)]
    assert rec._kept == 3 * per_session and MAX_KEPT_BLOCKS * 8 <= 64 * 2**20  # the default: at most 64 MB
    rec.arrived("again", 9.0, "s0", None)  # its last request was forgotten: written whole, still right
    rec.finished("again", 9.5, Finished(3 * BS, 1, [b"s0", b"s0+", b"s0++"]))
    last = json.loads(buf.getvalue().splitlines()[-1])
    assert last.get("reuse", 0) == 0 and len(last["blocks"]) == 3
    rec.arrived("next", 10.0, "s0", None)  # and its next one is a delta again
    rec.finished("next", 10.5, Finished(4 * BS, 1, [b"s0", b"s0+", b"s0++", b"s0+++"]))
    last = json.loads(buf.getvalue().splitlines()[-1])
    assert last["reuse"] == 3 and len(last["blocks"]) == 1


def test_a_turn_that_leaves_its_sessions_last_prompt_shares_only_the_common_head(tmp_path):
    buf = io.StringIO()
    rec = TraceRecording(buf, BS)
    chain = blocks("s", 10)
    branch = chain[:6] + [b"other:6", b"other:7"]  # chained ids: a branch never meets the chain again
    for i, b in enumerate((chain, branch, chain[:3])):
        rec.arrived(f"r{i}", float(i), "s", None)
        rec.finished(f"r{i}", i + 0.5, Finished(len(b) * BS, 1, b))
    lines = [json.loads(x) for x in buf.getvalue().splitlines()[1:]]
    assert [x.get("reuse", 0) for x in lines] == [0, 6, 3] and [len(x["blocks"]) for x in lines] == [10, 2, 0]
    assert lines[1]["blocks"][0] != lines[0]["blocks"][6]
    trace = load(buf, tmp_path)
    assert [len(trace.blocks(i)) for i in range(3)] == [10, 8, 3]


def test_a_full_recording_stops_whole_at_its_last_line(tmp_path):
    buf = io.StringIO()
    rec = TraceRecording(buf, BS, max_chars=600)
    for i in range(20):
        rec.arrived(f"r{i}", float(i), "s", None)
        rec.finished(f"r{i}", i + 0.5, Finished((i + 1) * BS, 1, blocks("s", i + 1)))
    assert rec.full and 600 <= rec.chars < 600 + 400 and 1 < rec.written < 20
    assert not rec._live  # later arrivals are not even kept
    assert not rec._last and not rec._running and rec._kept == 0  # nor what was kept for later lines
    trace = load(buf, tmp_path)
    assert len(trace.t) == rec.written and [len(trace.blocks(i)) for i in range(rec.written)] == list(
        range(1, rec.written + 1))


def test_how_much_of_the_last_turns_partial_block_a_prompt_repeats_is_recorded_not_its_tokens(tmp_path):
    """BS 4. Turn 1: prompt 1..6, output 7, 8 (KV of 7 tokens: block [1-4], tail [5, 6, 7]). Turn 2 repeats 5, 6 but
    re-tokenized the output (70): 2 of the tail. Turn 3 appends exactly: all 3 of turn 2's tail. Turn 4 leaves the
    history: not a continuation, nothing said."""
    buf = io.StringIO()
    rec = TraceRecording(buf, BS)
    turns = [([1, 2, 3, 4, 5, 6], [7, 8]),
             ([1, 2, 3, 4, 5, 6, 70, 9], [10, 11, 12, 13]),  # KV: 11 tokens, blocks [1-4] [5 6 70 9], tail [10 11 12]
             ([1, 2, 3, 4, 5, 6, 70, 9, 10, 11, 12, 13, 14], [15]),
             ([99, 98, 97, 96, 95], [1])]
    for i, (prompt, out) in enumerate(turns):
        tokens = prompt + out
        n = (len(tokens) - 1) // BS
        raw = [f"h{tokens[:BS * (k + 1)]}".encode() for k in range(n)]  # chained: a hash of the whole prefix
        rec.arrived(f"r{i}", float(i), "s", None)
        rec.finished(f"r{i}", i + 0.5, Finished(len(prompt), len(out), raw, tokens=tokens))
    lines = [json.loads(x) for x in buf.getvalue().splitlines()[1:]]
    assert [x.get("tail_reuse") for x in lines] == [None, 2, 3, None]
    fields = {"t", "session", "prompt_tokens", "output_tokens", "reuse", "blocks", "duration_s", "tail_reuse"}
    assert all(set(x) <= fields and all(isinstance(b, str) for b in x["blocks"]) for x in lines)  # a count, no token
    trace = load(buf, tmp_path)
    assert list(trace.tail_reuse) == [-1, 2, 3, -1]
    # turn 4's: a block, a tail of one token and its entry
    assert rec._kept == sum(x.kept for x in rec._last.values()) == 1 + 1 + ENTRY_OVERHEAD


def test_requests_of_no_session_keep_nothing_once_written(tmp_path):
    """Found by review: each request of no session (a session of its own, whose next request never comes) kept an
    entry for ever, counted as its block ids only: 200,000 such requests held 49-65 MB."""
    buf = io.StringIO()
    rec = TraceRecording(buf, BS)
    for i in range(500):
        rec.arrived(f"r{i}", float(i), None, None)
        n = i % 3  # blocks: none (a prompt under a block) to two
        rec.finished(f"r{i}", i + 0.5, Finished(max(n * BS, 1), 1, blocks(f"r{i}", n)))
    assert rec.written == 500 and not rec._last and rec._kept == 0 and not rec._live and not rec._running
    trace = load(buf, tmp_path)
    assert len(trace.t) == 500 and len(trace.sessions) == 500  # each still written as a session of its own


def test_sessions_of_no_block_count_against_the_bound():
    rec = TraceRecording(io.StringIO(), BS, max_kept_blocks=10 * ENTRY_OVERHEAD)
    for i in range(1000):
        rec.arrived(f"r{i}", float(i), f"s{i}", None)
        rec.finished(f"r{i}", i + 0.5, Finished(BS - 1, 1, []))  # under a block: no id, an entry all the same
    assert len(rec._last) == 10 and rec._kept == 10 * ENTRY_OVERHEAD
