"""KVSCHED_RECORD_TRACE on vLLM's real scheduler (harness.py): the recorded trace loads in the simulator with the
engine's own block structure, an existing file is never overwritten, and a bad path is refused before the engine
starts."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.harness import (  # noqa: E402
    FAKE_TOKEN,
    STOCK_SCHEDULER,
    PrefillCounts,
    RequestFactory,
    run_until_idle,
)
from kvsched.adapters.vllm.settings_check import engine_setting_errors  # noqa: E402
from kvsched.adapters.vllm.trace_recorder import ENV_MAX_MB, ENV_RECORD  # noqa: E402
from kvsched.cli import main  # noqa: E402
from kvsched.sim.trace import Trace  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402


def _run(s, f, prompts, **kw):
    reqs = [f.make(p, 5, **kw) for p in prompts]
    for r in reqs:
        s.add_request(r)
    run_until_idle(s)
    return reqs


def _tier_block_bytes(model_dir):
    """What the FP8 tier takes per block of the model, from its config: a byte per K and V element of every layer's
    KV heads, and one float32 scale per (layer, KV head) as the cache is bf16."""
    c = json.loads((model_dir / "config.json").read_text())
    return c["num_hidden_layers"] * c["num_key_value_heads"] * (BLOCK * 2 * c["head_dim"] + 4)


def test_a_recorded_session_replays_with_the_engines_blocks(harness_cfg, clock, tmp_path, monkeypatch):
    path = tmp_path / "rec.jsonl"
    path.write_text("someone else's file\n")
    monkeypatch.setenv(ENV_RECORD, str(path))
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    s.kvsched.recorder.clock = clock
    history = list(range(100, 180))  # 80 tokens: 5 full blocks
    for turn in range(3):
        _run(s, f, [history], session_id="agent-1", cache_salt="tenant-salt", xargs={"agent_role": "worker"})
        clock.advance(2.0)
        history = history + [7] * 4 + list(range(300 + 20 * turn, 320 + 20 * turn))  # output + a tool result
    _run(s, f, [[900 + i for i in range(40)]])  # a request of no session
    s.kvsched.recorder.close()
    assert path.read_text() == "someone else's file\n"  # never overwritten: the recording went beside it
    rec = tmp_path / "rec.1.jsonl"
    lines = [json.loads(x) for x in rec.read_text().splitlines()]
    header, body = lines[0], lines[1:]
    assert header["block_size"] == BLOCK and header["meta"]["capacity_blocks"] == 63
    assert header["meta"]["fp8_tier_block_bytes"] == _tier_block_bytes(harness_cfg.model_dir)
    assert len(body) == 4 and "agent-1" not in rec.read_text() and "tenant-salt" not in rec.read_text()
    turns = [x for x in body if x.get("role") == "worker"]
    assert [x["prompt_tokens"] for x in turns] == [80, 104, 128] and all(x["output_tokens"] == 5 for x in turns)
    assert [x.get("reuse", 0) for x in turns] == [0, 5, 6]  # each turn repeats the last prompt's full blocks
    # ... and the tokens past them with KV (the tier's tail): the outputs (FAKE_TOKEN, 7) but the last, which the next
    # prompt repeats ([7] * 4), after turn 1's 8 prompt tokens past its 6th block
    assert [x.get("tail_reuse") for x in turns] == [None, 4, 12]
    assert [x["t"] for x in turns] == [0.0, 2.0, 4.0] and len({x["session"] for x in turns}) == 1
    trace = Trace.load(rec)
    # every request's full blocks with KV: prompt + output - 1 tokens (the last sampled token was never fed back)
    assert [len(trace.blocks(i)) for i in range(len(trace.t))] == [5, 6, 8, 2]
    assert list(trace.blocks(1)[:5]) == list(trace.blocks(0)) and list(trace.blocks(2)[:6]) == list(trace.blocks(1))
    # and the simulator replays it at the engine's pool: every later turn hits its session's earlier blocks
    out = tmp_path / "sim.json"
    assert main(["simulate", str(rec), "--capacity-blocks", "63", "--policies", "lru,kvsched", "--out", str(out)]) == 0
    sim = json.loads(out.read_text())
    assert sim["lru"]["requests"] == sim["kvsched"]["requests"] == 4
    assert sim["lru"]["prompt_tokens_total"] == 80 + 104 + 128 + 40 and sim["kvsched"]["tokens_saved"] >= (5 + 6) * BLOCK


def test_a_missing_directory_is_refused_before_the_engine_starts(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "no-such-dir" / "rec.jsonl"))
    assert any(ENV_RECORD in e and "does not exist" in e for e in engine_setting_errors())
    monkeypatch.setenv(ENV_RECORD, str(tmp_path))
    assert any(ENV_RECORD in e and "directory" in e for e in engine_setting_errors())
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "ok.jsonl"))
    assert not [e for e in engine_setting_errors() if ENV_RECORD in e]
    for bad in ("0", "-5", "lots", "inf", "nan"):
        monkeypatch.setenv(ENV_MAX_MB, bad)
        assert any(ENV_MAX_MB in e for e in engine_setting_errors()), bad
    monkeypatch.setenv(ENV_MAX_MB, "0.5")
    assert not [e for e in engine_setting_errors() if "RECORD" in e]


def _random_sessions(s, f, counts, n=60):
    rng, hist = random.Random(0), {}
    for _ in range(n):
        sid = f"a{rng.randrange(6)}"
        h = hist.setdefault(sid, [rng.randrange(10, 2000) for _ in range(40)])
        h.extend(rng.randrange(10, 2000) for _ in range(rng.randint(5, 40)))
        if len(h) > 400:
            h[:] = h[:40]
        s.add_request(f.make(h, 4, session_id=sid, xargs={"ttl_s": 600}))
        run_until_idle(s, counts=counts)
        h.extend([FAKE_TOKEN] * 3)


def test_recording_with_pins_off_serves_exactly_what_stock_vllm_serves(harness_cfg, tmp_path, monkeypatch):
    """The documented way to record a deployment before switching: kvsched's scheduler with every TTL capped at 0
    (and the tier off) holds no pin, so the recording is of stock vLLM's behaviour, hit for hit."""
    stock = PrefillCounts()
    _random_sessions(_sched(harness_cfg, STOCK_SCHEDULER), RequestFactory(BLOCK), stock)
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "stock.jsonl"))
    monkeypatch.setenv("KVSCHED_MAX_TTL_S", "0")
    recorded = PrefillCounts()
    s = _sched(harness_cfg)
    _random_sessions(s, RequestFactory(BLOCK), recorded)
    assert (recorded.prompt_tokens, recorded.cached_tokens) == (stock.prompt_tokens, stock.cached_tokens)
    assert stock.cached_tokens > 0 and s.kvsched.stats()["pins"] == 0
    assert len(Trace.load(s.kvsched.recorder.path).t) == 60


def test_a_failing_or_full_recording_stops_and_the_engine_serves_on(harness_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "a.jsonl"))
    s, f = _sched(harness_cfg), RequestFactory(BLOCK)
    _run(s, f, [list(range(100, 180))], session_id="x")
    s.kvsched.recorder.stream.close()  # the disk went away under it: every later write raises
    counts = PrefillCounts()
    s.add_request(f.make(list(range(100, 200)), 4, session_id="x"))
    run_until_idle(s, counts=counts)
    assert s.kvsched.recorder.stopped and counts.cached_tokens == 80  # served, and from the session's pin
    assert not s.kvsched.recorder.recording._last and not s.kvsched.recorder.recording._live  # let go
    monkeypatch.setenv(ENV_MAX_MB, "0.0001")  # 100 characters: full after the first line
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "b.jsonl"))  # (a.jsonl's lines alone would reach the limit)
    s2 = _sched(harness_cfg)
    _run(s2, f, [list(range(100, 180)), list(range(400, 480))])
    rec = s2.kvsched.recorder
    assert rec.stopped and rec.recording.written == 1 and len(Trace.load(rec.path).t) == 1
    assert not rec.recording._last and rec.recording._kept == 0


def test_a_disk_that_fills_stops_the_recording_not_the_engine_and_the_lines_before_it_replay(harness_cfg, tmp_path,
                                                                                             monkeypatch, caplog):
    """Found by review: the failed write's flush failed again in `close()`, from inside the error handler, and the
    OSError (EFBIG, as a full disk gives) reached vLLM's step; the line cut short made the whole trace unreadable."""
    import resource

    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "full.jsonl"))
    s, f = _sched(harness_cfg), RequestFactory(BLOCK)
    path = s.kvsched.recorder.path
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 1500, hard))  # Python ignores SIGXFSZ: EFBIG
    try:
        for i in range(20):
            _run(s, f, [list(range(100 + i, 300 + i))], session_id=f"s{i}")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert s.kvsched.recorder.stopped and not s.has_requests()
    with caplog.at_level("WARNING"):
        trace = Trace.load(path)  # its whole lines: the last one was cut short by the full disk
    assert 0 < len(trace.t) < 20 and "cut short" in caplog.text


def test_a_request_aborted_while_it_waited_is_not_recorded_as_served(harness_cfg, tmp_path, monkeypatch):
    """Found by review: it was written with its prompt's blocks and no output, and replays counted its prefill."""
    from vllm.v1.request import RequestStatus

    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "a.jsonl"))
    s, f = _sched(harness_cfg), RequestFactory(BLOCK)
    _run(s, f, [list(range(100, 180))], session_id="x")
    queued = f.make([9] * 40, 4, session_id="y")
    s.add_request(queued)
    s.finish_requests([queued.request_id], RequestStatus.FINISHED_ABORTED)  # before any step scheduled it
    _run(s, f, [list(range(100, 200))], session_id="x")
    s.kvsched.recorder.close()
    trace = Trace.load(s.kvsched.recorder.path)
    assert len(trace.t) == 2 and sorted(trace.prompt_tokens) == [80, 100]


def test_a_request_preempted_before_its_first_output_counts_as_run() -> None:
    """Found by review: preemption sets the computed count back to 0, so a request preempted mid-prefill and then
    aborted read as never run and was left out of the recording."""
    from types import SimpleNamespace

    from kvsched.adapters.vllm.compat import request_ran

    assert not request_ran(SimpleNamespace(num_computed_tokens=0, num_output_tokens=0, num_preemptions=0))
    assert request_ran(SimpleNamespace(num_computed_tokens=0, num_output_tokens=0, num_preemptions=1))
    assert request_ran(SimpleNamespace(num_computed_tokens=32, num_output_tokens=0, num_preemptions=0))


def test_the_size_limit_bounds_every_recording_beside_the_path_together(harness_cfg, tmp_path, monkeypatch):
    """An engine restarted over and over got a new FILE.N of the whole limit each time: the disk filled one limit at a
    time. The limit now counts the recordings already there (FILE and FILE.N, nothing else beside them)."""
    path = tmp_path / "rec.jsonl"
    path.write_text("x" * 850)
    (tmp_path / "rec.3.jsonl").write_text("x" * 400)
    (tmp_path / "rec.old.jsonl").write_text("x" * 5000)  # not a numbered recording: not counted
    (tmp_path / "other.jsonl").write_text("x" * 5000)
    monkeypatch.setenv(ENV_RECORD, str(path))
    monkeypatch.setenv(ENV_MAX_MB, "0.001")  # 1,000 bytes: 1,250 already recorded
    s = _sched(harness_cfg)
    assert s.kvsched.recorder is None and not (tmp_path / "rec.1.jsonl").exists()
    _run(s, RequestFactory(BLOCK), [list(range(100, 180))], session_id="x")  # the engine serves on
    (tmp_path / "rec.3.jsonl").unlink()  # 150 bytes left: the next engine records until they are spent
    s2 = _sched(harness_cfg)
    rec = s2.kvsched.recorder
    assert rec is not None and rec.path == tmp_path / "rec.1.jsonl" and rec.recording.max_chars == 150
    _run(s2, RequestFactory(BLOCK), [[100 + i for i in range(80)], [400 + i for i in range(80)]])
    assert rec.stopped and rec.recording.written == 1


def test_data_parallel_engines_given_one_path_split_the_limit(harness_cfg, tmp_path, monkeypatch):
    """Found by review: data-parallel engines start together and each saw the whole room left."""
    from kvsched.adapters.vllm.trace_recorder import TraceRecorder

    path = tmp_path / "rec.jsonl"
    path.write_text("x" * 400)
    monkeypatch.setenv(ENV_MAX_MB, "0.001")  # 1,000 bytes: 600 left
    s = _sched(harness_cfg)
    s.parallel_config.data_parallel_size = 3
    engines = [TraceRecorder(s, path) for _ in range(3)]  # as each engine of three builds its own at start
    shares = [e.recording.max_chars for e in engines]  # each later one also counts the earlier ones' headers
    assert shares[0] == 200 and sum(shares) <= 600
    assert len({e.path for e in engines}) == 3
    for e in engines:
        e.close()


def test_a_tensor_parallel_engines_recording_names_its_ranks_bytes_together(harness_cfg, tmp_path, monkeypatch):
    """Found by review: the header named one rank's bytes (the KV cache spec is one rank's heads), so `kvsched simulate
    FILE --fp8-tier-gib G` of a TP=2 engine's recording replayed twice the slots the engine's `--kvsched-fp8-tier-gb
    G` gives (the host's total for its ranks)."""
    from kvsched.adapters.vllm import compat
    from kvsched.adapters.vllm.trace_recorder import TraceRecorder

    s = _sched(harness_cfg)
    per_rank = compat.kv_bytes_per_token(s)
    s.parallel_config.world_size = 2  # an engine of two ranks, each with the KV cache spec the harness gives
    rec = TraceRecorder(s, tmp_path / "rec.jsonl")
    rec.close()
    meta = json.loads(rec.path.read_text().splitlines()[0])["meta"]
    assert meta["fp8_tier_block_bytes"] == 2 * _tier_block_bytes(harness_cfg.model_dir)  # what both ranks take
    assert meta["kv_bytes_per_token"] == 2 * per_rank


def test_a_recording_that_cannot_be_opened_is_logged_and_the_engine_starts(harness_cfg, tmp_path, monkeypatch):
    """The start-up check passed, then the file could not be made (the directory went away, 10,000 recordings beside
    it): that raised out of the scheduler's constructor and the engine did not start."""
    from kvsched.adapters.vllm import trace_recorder

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "rec.jsonl"))
    monkeypatch.setattr(trace_recorder, "open_new", refuse)
    s = _sched(harness_cfg)
    assert s.kvsched.recorder is None
    _run(s, RequestFactory(BLOCK), [list(range(100, 180))], session_id="x")
    assert s.kvsched.stats()["pins"] == 1


def test_an_end_the_engine_ignored_is_recorded_as_none(harness_cfg, clock, tmp_path, monkeypatch):
    """Users A and B send the same first prompt without a session field: one inferred session, shared
    (`Lineage.shared_join`), so B's end hint on the turn after it is ignored (the pin stays for A). Found by review:
    the recording wrote that turn with its end, so a replay ended the session there and A's next turn, which hit its
    pin on the engine, started a new conversation in the simulator."""
    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "shared.jsonl"))
    monkeypatch.setenv("KVSCHED_PAYBACK_SAMPLING", "0")
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    first = [*range(100, 164), 500, 501, 502]  # 4 full blocks and 3 tokens
    for role in ("orchestrator", "worker"):  # A, then B with the same words (B's role is ignored too, as its end)
        s.add_request(f.make(first, 40, xargs={"agent_role": role, "ttl_s": 90 if role == "worker" else 300}))
        run_until_idle(s)
    answer = [FAKE_TOKEN] * 39  # its last full block lies past the prompt's: an ending turn joins by repeating it
    s.add_request(f.make([*first, *answer, 700, 701, 702, 703], 4, xargs={"session_end": 1}))  # B's last turn
    run_until_idle(s)
    assert s.kvsched.stats()["inferred_shared_ends_ignored"] == 1 and len(s.kvsched.policy.sessions) == 1
    s.kvsched.recorder.close()
    body = [json.loads(x) for x in s.kvsched.recorder.path.read_text().splitlines()[1:]]
    assert len(body) == 3 and len({x["session"] for x in body}) == 1 and not any(x.get("end") for x in body)
    assert [x.get("role") for x in body] == ["orchestrator", None, None]
    # B's 90 s hint did not shorten A's 300 s pin, nor did B's last turn without one: recorded as applied, so a
    # replay keeps A's pin as long as the engine did (found by review: written as sent)
    assert [x.get("ttl_s") for x in body] == [300, 300, 300]


def test_requests_aborted_while_they_ran_leave_nothing_behind(harness_cfg, tmp_path, monkeypatch):
    """Checked after a review asked whether they stayed in the recording's running table: vLLM 0.32's
    `finish_requests(..., FINISHED_ABORTED)` frees a running request's blocks through `_free_blocks`, kvsched's hook,
    so it is written (it ran) and let go, mid-prefill (chunked) or mid-decode."""
    import dataclasses

    from vllm.v1.request import RequestStatus

    from kvsched.adapters.vllm.harness import step

    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "a.jsonl"))
    cfg = dataclasses.replace(harness_cfg, max_num_batched_tokens=32, max_num_seqs=4)
    s, f = _sched(cfg), RequestFactory(BLOCK)
    reqs = [f.make(list(range(100 + 7 * i, 180 + 7 * i)), 20, session_id=f"s{i % 2}") for i in range(4)]
    for r in reqs:
        s.add_request(r)
    for _ in range(4):
        step(s)
    assert [r.num_computed_tokens > 0 for r in reqs] == [True, True, False, False]
    s.finish_requests([r.request_id for r in reqs[:3]], RequestStatus.FINISHED_ABORTED)
    run_until_idle(s)
    rec = s.kvsched.recorder.recording
    assert not rec._live and not rec._running
    s.kvsched.recorder.close()
    assert len(Trace.load(s.kvsched.recorder.path).t) == 3  # the two that ran and the one served; not the waiting one


def test_a_request_aborted_mid_prefill_is_recorded_as_far_as_the_engine_computed_it(harness_cfg, tmp_path,
                                                                                    monkeypatch):
    """Found by review: 16 of its 80 prompt tokens computed (chunked prefill), then aborted, it was written with all 80
    and 5 blocks, though the engine computed and cached 1: a replay charged the whole prefill and gave the session's
    next turn hits the engine never had. Now it is written as vLLM's computed count at the free says."""
    import dataclasses

    from vllm.v1.request import RequestStatus

    from kvsched.adapters.vllm.harness import step

    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "a.jsonl"))
    s = _sched(dataclasses.replace(harness_cfg, max_num_batched_tokens=16, max_num_seqs=4))
    f = RequestFactory(BLOCK)
    r = f.make(list(range(100, 180)), 5, session_id="x")
    s.add_request(r)
    step(s)
    assert r.num_computed_tokens == 16 and not r.num_output_tokens
    s.finish_requests([r.request_id], RequestStatus.FINISHED_ABORTED)
    _run(s, f, [list(range(100, 200))], session_id="x")  # its retry: the engine hit 1 block of it
    s.kvsched.recorder.close()
    body = [json.loads(x) for x in s.kvsched.recorder.path.read_text().splitlines()[1:]]
    assert [(x["prompt_tokens"], x["output_tokens"], len(x["blocks"]), x.get("reuse", 0)) for x in body] == [
        (16, 0, 1, 0), (100, 5, 5, 1)]
    assert [len(Trace.load(s.kvsched.recorder.path).blocks(i)) for i in range(2)] == [1, 6]


def test_a_request_preempted_mid_prefill_and_aborted_before_it_ran_again_counts_the_blocks_it_left_cached(
        harness_cfg, tmp_path, monkeypatch):
    """vLLM sets a preempted request's computed count to 0 (its blocks freed, their hashes kept): aborted before it ran
    again, the count says nothing of the 105 tokens it had computed. It is written with the leading run of its prompt's
    full blocks the prefix cache still holds at the free (6 here), as a replay of it would hold them."""
    import dataclasses

    from vllm.v1.request import RequestStatus

    from kvsched.adapters.vllm.harness import step

    monkeypatch.setenv(ENV_RECORD, str(tmp_path / "a.jsonl"))
    s = _sched(dataclasses.replace(harness_cfg, num_blocks=12, max_num_batched_tokens=16, max_num_seqs=4))
    f = RequestFactory(BLOCK)
    a = f.make(list(range(100, 140)), 60, session_id="a")  # decoding: 3 blocks, then a 4th and a 5th
    b = f.make(list(range(300, 428)), 5, session_id="b")  # 8 blocks: with a's 3 the pool's 11
    s.add_request(a)
    while a.num_computed_tokens < 45:
        step(s)
    s.add_request(b)
    while not b.num_preemptions:  # a's 5th block preempts b mid-prefill
        step(s)
    assert (b.num_computed_tokens, b.num_output_tokens) == (0, 0)
    s.finish_requests([b.request_id], RequestStatus.FINISHED_ABORTED)
    counts = PrefillCounts()
    s.add_request(f.make(list(range(300, 428)), 5, session_id="b"))  # its retry
    run_until_idle(s, counts=counts)
    s.kvsched.recorder.close()
    body = [json.loads(x) for x in s.kvsched.recorder.path.read_text().splitlines()[1:]]
    aborted = [x for x in body if x["output_tokens"] == 0]
    assert [(x["prompt_tokens"], len(x["blocks"])) for x in aborted] == [(6 * BLOCK, 6)]
    # its retry hit 4 of them: a's decode took 2 more blocks meanwhile, evicting b's last two (freed tail first)
    assert counts.cached_tokens == 4 * BLOCK
