"""The disk and shared levels on real `vllm serve --scheduler kvsched` engines and a real redis-server: an engine
restarted on its disk directory serves its sessions' next turns from disk (torn and corrupted files recomputed, never
served); a session moved to another replica keeps its KV and its compaction summary through the store, and its KV
through a slow store too (read off the scheduler thread); the store killed mid-run costs no request and is
reconnected; a replica killed mid-stream loses no session."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

from kvsched.adapters.store.local_redis import LocalRedis, RedisUnavailable  # noqa: E402
from kvsched.bench.delay_proxy import delayed  # noqa: E402
from kvsched.serving import ServerSpec, VllmServer  # noqa: E402
from tests import background  # noqa: E402
from tests.vllm_layout import worker  # noqa: E402

pytestmark = pytest.mark.integration
BLOCK = 32
SYSTEM = "You are a careful research agent. Use the tools and report every number you find. " * 4
COMPACTION_ENV = {"KVSCHED_COMPACTION_TRIGGER_TOKENS": "150", "KVSCHED_COMPACTION_KEEP_RECENT_MESSAGES": "2",
                  "KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS": "16", "KVSCHED_COMPACTION_WAIT_FOR_SUMMARY": "1",
                  "KVSCHED_COMPACTION_CLIENT_STRATEGIES": "summarize"}  # the client picks summarize (X-KVSched-Compaction)


def spec(model, *levels, env=None):
    return ServerSpec(model=model, scheduler="kvsched", max_model_len=2048, num_blocks=160,
                      extra_args=["--kvsched-fp8-tier-gb", "0.05", "--enable-prompt-tokens-details", *levels],
                      env=dict(env or {}), worker=worker())


def chat(server, messages, session, max_tokens=8, compaction=None, stream=False):
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
    headers = {"X-Session-Id": session} | ({"X-KVSched-Compaction": compaction} if compaction else {})
    if stream:
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0,
                                              extra_headers=headers, stream=True)
    raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                           temperature=0, extra_headers=headers)
    return raw.parse(), raw.headers


def cached(reply) -> int:
    details = reply.usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def wait_metric(server, name, at_least, timeout_s=30.0) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        value = server.metrics().get(name, 0.0)
        if value >= at_least or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def wait_stable(server, name, quiet_s=1.0, timeout_s=30.0) -> float:
    """Wait until a counter stops moving (the background writer has caught up)."""
    deadline = time.monotonic() + timeout_s
    last, since = -1.0, time.monotonic()
    while time.monotonic() < deadline:
        value = server.metrics().get(name, 0.0)
        if value != last:
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
        time.sleep(0.2)
    return last


def wait_store_stable(url, quiet_s=1.0, timeout_s=30.0) -> None:
    """Wait until the shared store's key count stops moving (the replicas' background writers have caught up)."""
    import redis as redis_client

    store = redis_client.Redis.from_url(url)
    deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        n = store.dbsize()
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.2)


def history(sid, words=170):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"tool output of {sid}: " + " ".join(
        f"row{i}={(i * 7919 + len(sid)) % 1000}" for i in range(words))}]


@pytest.fixture(scope="module")
def redis():
    try:
        server = LocalRedis()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    with server:
        yield server


# ---- the disk level ---------------------------------------------------------------------------------------------
def launch_meanwhile(request, fixture):
    """Launch a later test's servers now (the fixture launches them without waiting, in the background: a lower CPU
    priority until their test takes them, tests/background.py), so that their start-ups overlap this test's own and
    take the CPU its engines leave idle. None without a store (those tests skip)."""
    try:
        request.getfixturevalue(fixture)
    except pytest.skip.Exception:
        pass


def test_a_restarted_engine_serves_its_sessions_next_turns_from_disk_and_never_a_torn_block(tiny_model_dir,
                                                                                            tmp_path, request):
    disk = str(tmp_path / "kv")
    sessions = {f"disk-{i}": history(f"disk-{i}") for i in range(4)}
    reference = {}
    damaged = list(sessions)[-1]
    launch_meanwhile(request, "replicas_launched")
    with VllmServer(spec(tiny_model_dir, "--kvsched-disk-tier-dir", disk)) as a:
        for sid, msgs in sessions.items():
            first, _ = chat(a, msgs, sid)
            # the damaged session's next turn adds several blocks, the others' at most one: its reference turn runs
            # last, so the newest files on disk are its last blocks
            more = "next " + ("value " * 120 if sid == damaged else "")
            msgs += [{"role": "assistant", "content": first.choices[0].message.content},
                     {"role": "user", "content": more}]
        for sid, msgs in sessions.items():  # the next turn as this engine answers it, from its own exact KV
            reference[sid] = chat(a, msgs, sid, max_tokens=12)[0]
        written = wait_stable(a, "kvsched_disk_tier_written_blocks_total")
        assert written >= max(r.usage.prompt_tokens for r in reference.values()) // BLOCK, a.log_tail()
    # fault injection between the runs: the last session's last blocks but one torn and flipped (the newest file is
    # its prompt's last full block, which vLLM computes anyway: the arrival's fetch stops before it)
    files = sorted((p for p in (tmp_path / "kv").rglob("*.kv")), key=lambda p: p.stat().st_mtime)
    assert len(files) >= written
    torn, flipped = files[-2], files[-3]
    torn.write_bytes(torn.read_bytes()[:-64])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0x41
    flipped.write_bytes(bytes(data))
    launch_meanwhile(request, "slow_store_replica")
    with VllmServer(spec(tiny_model_dir, "--kvsched-disk-tier-dir", disk)) as b:
        start = b.metrics()
        # every file the first engine left (its shutdown flushes the writes still queued), the damaged ones too:
        # their payload is checked when read
        assert start["kvsched_disk_tier_indexed_blocks_total"] == len(files)
        replies = {sid: chat(b, msgs, sid, max_tokens=12)[0] for sid, msgs in sessions.items() if sid != damaged}
        mid = b.metrics()
        replies[damaged] = chat(b, sessions[damaged], damaged, max_tokens=12)[0]
        end = b.metrics()
    # the engine's own metrics: a fresh engine, so every prompt token it did not compute came from the disk level
    d = {k: mid.get(k, 0.0) - start.get(k, 0.0) for k in mid}
    prompt = d["vllm:prompt_tokens_total"]
    hits = d["vllm:prefix_cache_hits_total"] + d.get("vllm:external_prefix_cache_hits_total", 0.0)
    assert prompt == sum(r.usage.prompt_tokens for sid, r in replies.items() if sid != damaged)
    assert hits >= 0.9 * prompt, (hits, prompt)
    assert d["kvsched_disk_tier_restored_blocks_total"] * BLOCK >= 0.85 * prompt  # shared system blocks read once
    # read off the step (a background fetch per worker): each session's request waited for its own blocks
    assert d["kvsched_levels_fetch_waits_total"] == len(sessions) - 1 and end["kvsched_levels_fetching_blocks"] == 0
    for sid, r in replies.items():
        if sid != damaged:
            assert cached(r) >= 0.9 * r.usage.prompt_tokens, (sid, cached(r), r.usage.prompt_tokens)
    # the torn and the flipped block were skipped, not served: that session recomputed from the first bad block on
    assert end["kvsched_disk_tier_read_failures_total"] == 2
    for sid, reply in replies.items():  # restored (FP8) or recomputed: the greedy continuation is the same
        assert reply.choices[0].message.content == reference[sid].choices[0].message.content, sid


# ---- the shared level -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def replicas_launched(tiny_model_dir, redis):
    """Two replicas sharing the store, launched together (their start-ups overlap, and the first test's too)."""
    b, c = (VllmServer(spec(tiny_model_dir, "--kvsched-store-url", redis.url,
                            env=COMPACTION_ENV | {"KVSCHED_REPLICA_NAME": name})) for name in ("b", "c"))
    try:
        background.lower(b.launch())
        background.lower(c.launch())
        yield b, c
    finally:
        c.stop()
        b.stop()


@pytest.fixture(scope="module")
def replicas(replicas_launched):
    for server in replicas_launched:
        background.restore(server).start()  # waits: launched already
    return replicas_launched


@pytest.fixture(scope="module")
def slow_store_replica(tiny_model_dir, redis):
    """A replica reading the store 10 ms away (a delaying proxy on loopback), launched (the first test launches it
    with its restarted engine: their start-ups overlap); no request reaches it before its test."""
    with delayed(redis.port, 0.010) as port:
        d = VllmServer(spec(tiny_model_dir, "--kvsched-store-url", f"redis://127.0.0.1:{port}/0",
                            env={"KVSCHED_REPLICA_NAME": "d"}))
        try:
            yield background.lower(d.launch())
        finally:
            d.stop()


def test_a_moved_session_keeps_its_kv_and_is_served_compacted_at_once(replicas, redis):
    b, c = replicas
    msgs = history("moved", words=120)
    compacted = 0
    for turn in range(6):
        reply, headers = chat(b, msgs, "moved", compaction="summarize")
        compacted, last_prompt = int(headers.get("x-kvsched-compacted", 0)), reply.usage.prompt_tokens
        msgs += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": f"tool result {turn}: " + "value " * 40}]
        if compacted and turn >= 2:
            break
    assert compacted, "the session never got compacted on its first replica"
    wait_metric(b, "kvsched_compaction_shared_checkpoints_saved_total", 1)
    wait_store_stable(redis.url)  # the turn's blocks are written behind (a fixed wait was a bet on the host's speed)
    before = c.metrics()
    reply, headers = chat(c, msgs, "moved", compaction="summarize")
    after = c.metrics()
    assert int(headers.get("x-kvsched-compacted", 0)) >= compacted  # compacted on its first turn here
    assert after["kvsched_compaction_summary_calls_total"] == before.get("kvsched_compaction_summary_calls_total", 0)
    assert after["kvsched_moved_sessions_total"] - before.get("kvsched_moved_sessions_total", 0) == 1
    assert after["kvsched_levels_fetch_waits_total"] - before["kvsched_levels_fetch_waits_total"] == 1  # off the step
    restored = after["kvsched_shared_tier_restored_blocks_total"] - before["kvsched_shared_tier_restored_blocks_total"]
    # every full block of what the first replica computed last turn came back: only the new turn's text is prefilled
    assert restored >= 1 and cached(reply) >= last_prompt // BLOCK * BLOCK, (restored, cached(reply), last_prompt)


def test_a_moved_session_is_restored_through_a_slow_store_read_off_the_scheduler_thread(replicas, redis,
                                                                                          slow_store_replica):
    """The store 10 ms away (a delaying proxy on loopback): the first arrival's reads find it slow, and the next
    arrivals' reads run on the lookup thread, the request waiting for its answer; a moved session still gets its KV."""
    b, _ = replicas
    d = background.restore(slow_store_replica).start()  # waits: launched already
    try:  # stopped when done (its memory back for the next tests)
        chat(d, history("warm-up", words=40), "warm-up")  # read inline: the store is found slow
        msgs = history("moved-slow", words=120)
        reply, _ = chat(b, msgs, "moved-slow")
        last_prompt = reply.usage.prompt_tokens
        msgs += [{"role": "assistant", "content": reply.choices[0].message.content},
                 {"role": "user", "content": "tool result: " + "value " * 40}]
        wait_store_stable(redis.url)
        before = d.metrics()
        reply, _ = chat(d, msgs, "moved-slow")
        after = d.metrics()
    finally:
        d.stop()
    assert after["kvsched_store_lookup_waits_total"] - before.get("kvsched_store_lookup_waits_total", 0) == 1
    assert after["kvsched_store_lookup_overdue_total"] == 0
    assert after["kvsched_moved_sessions_total"] - before.get("kvsched_moved_sessions_total", 0) == 1
    restored = after["kvsched_shared_tier_restored_blocks_total"] - before["kvsched_shared_tier_restored_blocks_total"]
    assert restored >= 1 and cached(reply) >= last_prompt // BLOCK * BLOCK, (restored, cached(reply), last_prompt)


def test_store_killed_mid_run_every_turn_is_answered_and_it_reconnects(replicas, redis):
    b, c = replicas
    msgs = {s: history(s, words=60) for s in ("outage-1", "outage-2")}
    for sid, m in msgs.items():
        chat(b, m, sid)
    redis.kill()
    try:
        for turn in range(3):
            for server in (b, c):  # a moved session too: nothing to restore, recomputed
                for sid, m in msgs.items():
                    reply, _ = chat(server, m + [{"role": "user", "content": f"turn {turn}"}], sid)
                    assert reply.choices[0].message.content is not None
        for server in (b, c):
            m = server.metrics()
            assert m["kvsched_store_up"] == 0 and m["kvsched_store_outages_total"] == 1
    finally:
        redis.start()
    def logged(server, word):  # lines per process (engine, worker: each uses the store and logs its own outage)
        lines = server.log_path.read_text(errors="replace").splitlines()
        return Counter(line.split(")", 1)[0] for line in lines if word in line)

    for server in (b, c):
        # The retry delay doubles per failed attempt (0.5 s, capped at 30 s): a slow host makes more attempts during
        # the outage above, so a process's first attempt after the restart may be seconds away. Turns keep coming
        # until every process that lost the store has it back.
        deadline = time.monotonic() + 45
        while not (server.metrics()["kvsched_store_up"] == 1
                   and set(logged(server, "reachable again")) >= set(logged(server, "unreachable"))):
            assert time.monotonic() < deadline, ("no reconnect 45 s after the store came back", server.log_tail(30))
            for sid, m in msgs.items():
                chat(server, m + [{"role": "user", "content": "back"}], sid)
            time.sleep(0.5)
        for word in ("unreachable", "reachable again"):  # once per process that uses the store, not once per call
            per_process = logged(server, word)
            assert per_process and set(per_process.values()) == {1}, (word, per_process, server.log_tail(30))


def test_a_replica_killed_with_sessions_in_flight_loses_no_session(replicas, redis):
    b, c = replicas
    sids = ["inflight-1", "inflight-2"]
    for server in (b, c):  # the store is reachable for both (an earlier test's outage is over), or nothing is shared
        assert server.metrics()["kvsched_store_up"] == 1, server.log_tail(30)
    msgs = {s: history(s, words=150) for s in sids}
    first = {}
    for sid in sids:
        first[sid], _ = chat(b, msgs[sid], sid)
        msgs[sid] += [{"role": "assistant", "content": first[sid].choices[0].message.content},
                      {"role": "user", "content": "continue"}]
    wait_store_stable(redis.url)  # written behind
    errors: list[BaseException] = []

    def stream(sid):
        try:
            for _ in chat(b, msgs[sid], sid, max_tokens=400, stream=True):
                pass
        except Exception as exc:  # noqa: BLE001 - expected: the replica dies mid-stream
            errors.append(exc)

    threads = [threading.Thread(target=stream, args=(s,)) for s in sids]
    for t in threads:
        t.start()
    time.sleep(1.0)
    os.killpg(b.proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    b.proc.wait(10)
    before = c.metrics()
    for sid in sids:  # the client retries each turn on the ring successor
        reply, _ = chat(c, msgs[sid], sid)
        assert cached(reply) >= first[sid].usage.prompt_tokens // BLOCK * BLOCK, (sid, cached(reply))
    after = c.metrics()
    assert after["kvsched_moved_sessions_total"] - before["kvsched_moved_sessions_total"] == 2
    assert after["kvsched_shared_tier_read_failures_total"] == before["kvsched_shared_tier_read_failures_total"]
