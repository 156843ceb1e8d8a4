"""What the autoscaling policy reads as pressure: requests queued in Ray in front of the engines, and a P95 TTFT only
from enough first tokens to have one."""

from __future__ import annotations

import http.client
from types import SimpleNamespace
from typing import Any

import pytest

from kvsched.adapters.ray.autoscaling import FRESH_TTFT, HELD_TTFT, QueueTTFTPolicy


def ctx(queued_in_ray: float | None, replicas: int = 2, ttft: float = 0.6) -> SimpleNamespace:
    names = [f"r{i}" for i in range(replicas)]
    return SimpleNamespace(running_replicas=names, current_num_replicas=replicas, target_num_replicas=replicas,
                           current_time=1000.0, policy_state={}, total_queued_requests=queued_in_ray,
                           aggregated_metrics={"queue_depth": {r: 0.0 for r in names},
                                               FRESH_TTFT: {r: ttft for r in names},
                                               HELD_TTFT: {r: ttft for r in names}})


def test_requests_queued_in_ray_count_as_queue_depth() -> None:
    """Found by review: with every replica at max_ongoing_requests, Ray's handles hold the rest; the engines report
    no queue and vLLM's TTFT starts at the engine, so 500 requests waiting in Ray on 2 replicas read as steady (and an
    idle-looking pool could scale down under the backlog)."""
    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=8, queue_per_replica=4.0, ttft_p95_s=2.0)
    n, state = policy(ctx(500.0))
    assert n == 8 and "queue" in state["kvsched_reason"]
    assert policy(ctx(6.0))[0] == 2  # 6 waiting on 2 replicas: under 4 each, over the downscale share: steady
    assert policy(ctx(None, ttft=0.1))[0] == 1  # nothing queued anywhere (Ray may give None): idle, down one



BOUNDS = (0.1, 0.5, 1.0, 2.5, 5.0)


def ttft_metrics(counts: dict[float, int]) -> str:
    """vLLM's TTFT histogram, cumulative, with `counts` first tokens per bucket bound (one engine's series)."""
    return engines_metrics({"": counts})


def test_a_fresh_p95_counts_only_from_enough_first_tokens() -> None:
    """Found by review: one slow first token (a cold 30k-token prefill) since the previous report was the whole
    "P95", and an idle one-replica pool was asked to grow to three. Fewer than MIN_TTFT_SAMPLES first tokens give no
    fresh P95; they count with the next ones, unless they gathered for longer than `hold_s`."""
    from kvsched.adapters.ray.autoscaling import decide
    from kvsched.adapters.ray.stats import ReplicaStats
    from kvsched.core.routing_autoscale import AutoscaleTargets

    now = [0.0]
    st = ReplicaStats("http://x", clock=lambda: now[0], hold_s=60.0)
    st.update(ttft_metrics({}), None)  # a fresh server: the baseline
    st.update(ttft_metrics({0.1: 500}), None)
    assert st.fresh_ttft_p95() is not None  # 500 fast ones
    st.update(ttft_metrics({0.1: 500, 5.0: 1}), None)  # then one slow one, queue empty
    fresh = st.fresh_ttft_p95()
    assert fresh is None
    agg = {"queue_depth": {"r0": 0.0}, HELD_TTFT: {"r0": st.ttft_p95_s}}
    targets = AutoscaleTargets(min_replicas=1, max_replicas=4, ttft_p95_s=2.0)
    assert decide(1, agg, ["r0"], targets, now_s=100.0).replicas == 1
    from kvsched.adapters.ray.stats import MIN_TTFT_SAMPLES

    now[0] = 10.0  # more slow ones: with the first, enough for a P95
    st.update(ttft_metrics({0.1: 500, 5.0: MIN_TTFT_SAMPLES}), None)
    assert st.fresh_ttft_p95() > 2.5
    now[0] = 20.0
    st.update(ttft_metrics({0.1: 500, 5.0: MIN_TTFT_SAMPLES + 5}), None)
    assert st.fresh_ttft_p95() is None  # five since: too few
    now[0] = 100.0  # and too old to count with the next ones
    assert st.fresh_ttft_p95() is None
    st.update(ttft_metrics({0.1: 500 + MIN_TTFT_SAMPLES - 1, 5.0: MIN_TTFT_SAMPLES + 5}), None)
    assert st.fresh_ttft_p95() is None  # 19 fast ones since the old five were dropped


# ---- the fleet's P95 from the replicas' merged buckets ---------------------------------------------------------
def reports(counts_by_replica: dict[str, list[dict[float, int]]]) -> list[dict[str, dict[str, float]]]:
    """What each replica's `EngineReplica.record_autoscaling_stats` reports at each scrape of `ttft_metrics(counts)`:
    one dict per scrape, metric name -> replica -> value."""
    return reports_of_text({r: [ttft_metrics(c) for c in counts] for r, counts in counts_by_replica.items()})


def reports_of_text(texts_by_replica: dict[str, list[str]]) -> list[dict[str, dict[str, float]]]:
    """`reports` from each scrape's metrics text."""
    import asyncio

    from kvsched.adapters.ray.engine import EngineReplica
    from kvsched.adapters.ray.stats import ReplicaStats

    record = getattr(EngineReplica, "func_or_class", EngineReplica).record_autoscaling_stats
    out: list[dict[str, dict[str, float]]] = [{} for _ in next(iter(texts_by_replica.values()))]
    for name, texts in texts_by_replica.items():
        st = ReplicaStats("http://x", clock=lambda: 0.0)

        async def fresh_stats(st: ReplicaStats = st) -> dict:
            return st.snapshot()

        for i, text in enumerate(texts):
            st.update(text, None)
            for metric, v in asyncio.run(record(SimpleNamespace(stats=st, _fresh_stats=fresh_stats))).items():
                out[i].setdefault(metric, {})[name] = v
    return out


def fleet_ctx(window: list[dict[str, dict[str, float]]], now: float, state: dict | None = None) -> SimpleNamespace:
    """Ray's context over a look-back window of those reports, 10 s apart: `raw_metrics` as Ray keeps the points,
    `aggregated_metrics` each metric's last value (Ray's time-average, for reports that do not change)."""
    from ray.serve._private.common import TimeStampedValue

    names = sorted({r for scrape in window for series in scrape.values() for r in series})
    raw: dict[str, dict[str, list]] = {}
    for i, scrape in enumerate(window):
        for metric, series in scrape.items():
            for r, v in series.items():
                raw.setdefault(metric, {}).setdefault(r, []).append(TimeStampedValue(now - 10.0 * (len(window) - i), v))
    agg = {metric: {r: pts[-1].value for r, pts in series.items()} for metric, series in raw.items()}
    return SimpleNamespace(running_replicas=names, current_num_replicas=len(names), target_num_replicas=len(names),
                           current_time=now, policy_state=state or {}, total_queued_requests=0.0,
                           aggregated_metrics=agg, raw_metrics=raw)


def test_eight_replicas_one_slow_scale_on_the_fleets_p95_not_the_slowest_replicas() -> None:
    """Found by review: the policy took the slowest replica's P95 as the pool's. Eight replicas, 100 first tokens
    each in the window, one of them slow on 10 of its 100: its own P95 is 3.75 s (target 2 s) and the policy asked
    for 15 replicas; the fleet's P95, from the merged buckets, is under 0.1 s: steady."""
    fast, slow = {0.1: 100}, {0.1: 90, 5.0: 10}
    window = reports({**{f"r{i}": [{}, fast] for i in range(7)}, "r7": [{}, slow]})
    assert window[-1]["ttft_p95_fresh_s"]["r7"] == 3.75  # the slow replica's own P95, still reported
    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=16, queue_per_replica=4.0, ttft_p95_s=2.0)
    ctx = fleet_ctx(window, now=1000.0)
    ctx.aggregated_metrics["queue_depth"] = {r: 2.5 for r in ctx.running_replicas}  # queues within target
    n, state = policy(ctx)
    assert n == 8, state["kvsched_reason"]
    assert "fleet p95 0.0962 s from the merged buckets of 8 of 8 replicas (800 first tokens)" in state["kvsched_reason"]


def test_a_running_replica_with_no_ttft_buckets_in_the_window_is_waited_for_not_left_out() -> None:
    """Found on a real Ray cluster on a loaded host (test_serve_autoscaling.py): of two running replicas only the
    slow one (its own P95 3.75 s) had TTFT buckets in Ray's window, the other's reports had not reached Ray yet, and
    the pool's P95 was the slow one's alone: "up: p95 ttft at 1.88x target", four replicas asked for. No fleet value
    until each running replica has a window, as for one with a single scrape in it."""
    window = reports({"r0": [{}, {0.1: 90, 5.0: 10}, {0.1: 180, 5.0: 20}]})
    ctx = fleet_ctx(window, now=1000.0)
    ctx.running_replicas, ctx.current_num_replicas, ctx.target_num_replicas = ["r0", "r1"], 2, 2  # r1: no report yet
    n, state = QueueTTFTPolicy(min_replicas=2, max_replicas=4, ttft_p95_s=2.0)(ctx)
    assert n == 2 and "fleet p95 none" in state["kvsched_reason"], state["kvsched_reason"]
    assert "replica r1 has reported no TTFT buckets yet" in state["kvsched_reason"], state["kvsched_reason"]
    ctx.running_replicas, ctx.current_num_replicas, ctx.target_num_replicas = ["r0"], 1, 1  # r0 alone: its P95 is
    n, state = QueueTTFTPolicy(min_replicas=1, max_replicas=4, ttft_p95_s=2.0)(ctx)  # the pool's
    assert n == 2 and "fleet p95 3.75 s from the merged buckets of 1 of 1" in state["kvsched_reason"], state


def test_replicas_with_different_bucket_bounds_fall_back_to_the_slowest_replica_and_say_so() -> None:
    window = reports({"r0": [{}, {0.1: 100}], "r1": [{}, {0.1: 90, 5.0: 10}]})
    for scrape in window:  # r1's vLLM with other buckets (--custom-histogram-buckets): one bound moved
        scrape["ttft_le:0.2"] = {"r1": scrape.pop("ttft_le:0.1")["r1"]}
    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=8, ttft_p95_s=2.0)
    n, state = policy(fleet_ctx(window, now=1000.0))
    assert n == 4 and "slowest replica's p95" in state["kvsched_reason"] and "bounds differ" in state["kvsched_reason"]


def test_a_quiet_window_holds_the_fleets_last_p95_against_a_scale_down_only() -> None:
    """A window with too few first tokens is no TTFT signal (neither 0 nor inf): it scales nothing up, and the last
    fleet P95 (1.75 s of a 2 s target) keeps the pool from scaling down for the pool's `ttft_hold_s` (default 60 s)."""
    from kvsched.core.ttft_histogram import TTFT_HOLD_S as HOLD_S

    busy = {0.1: 90, 2.5: 10}
    window = reports({"r0": [{}, busy, busy, busy], "r1": [{}, busy, busy, busy]})
    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=8, ttft_p95_s=2.0)
    n, state = policy(fleet_ctx(window[:2], now=1000.0))
    assert n == 2 and "fleet p95 1.75 s" in state["kvsched_reason"]
    n, state = policy(fleet_ctx(window[2:], now=1030.0, state=state))  # nothing new since: an empty window
    assert n == 2 and "steady: the recent p95 ttft keeps this size" in state["kvsched_reason"]
    n, state = policy(fleet_ctx(window[2:], now=1001.0 + HOLD_S, state=state))
    assert n == 1, state["kvsched_reason"]


def test_a_restarted_engines_first_tokens_count_from_zero() -> None:
    """vLLM restarted under the replica: its TTFT counts start over, below the ones scraped before. Differencing them
    gave negative counts, read as no first tokens: the held P95 stayed the old server's (fast) one and the fresh P95
    was None until the new server had counted past the old one or `hold_s` ran out. A drop is a counter reset (as in
    Prometheus's rate()): the new server's 40 slow first tokens are the P95, in both readings."""
    from kvsched.adapters.ray.stats import ReplicaStats

    now = [0.0]
    st = ReplicaStats("http://x", clock=lambda: now[0], hold_s=60.0)
    st.update(ttft_metrics({}), None)  # a fresh server: the baseline
    st.update(ttft_metrics({0.1: 500}), None)
    assert st.fresh_ttft_p95() < 0.1 and st.ttft_p95_s < 0.1  # 500 fast ones
    now[0] = 10.0
    st.update(ttft_metrics({5.0: 40}), None)  # restarted: 40 slow ones since, every count below the old server's
    assert st.ttft_p95_s == pytest.approx(2.5 + 2.5 * 0.95)  # rank 38 of 40, in (2.5, 5]
    assert st.fresh_ttft_p95() == pytest.approx(2.5 + 2.5 * 0.95)
    now[0] = 20.0
    st.update(ttft_metrics({0.1: 30, 5.0: 40}), None)  # then 30 fast ones on the new server: no reset, a difference
    assert st.ttft_p95_s == pytest.approx(0.095) and st.fresh_ttft_p95() == pytest.approx(0.095)


def test_a_scrape_missing_a_bucket_is_no_counter_reset() -> None:
    """Found by review: a scrape lacking one of the previous scrape's bounds read as a restart (other bounds), so the
    server's whole history counted as new twice (that scrape and the next, whose bounds differed again): 500 slow
    first tokens of long ago were the P95 (4.87 s) of a replica serving 30 fast ones. Such a scrape is skipped: its
    first tokens count in the next complete scrape's increase; missing for longer than `hold_s`, it is the layout."""
    from kvsched.adapters.ray.stats import ReplicaStats

    now = [0.0]
    st = ReplicaStats("http://x", clock=lambda: now[0], hold_s=60.0)
    st.update(ttft_metrics({}), None)  # a fresh server: the baseline
    st.update(ttft_metrics({5.0: 500}), None)
    assert st.fresh_ttft_p95() == pytest.approx(2.5 + 2.5 * 0.95)  # 500 slow ones, reported
    now[0] = 10.0
    partial = "\n".join(line for line in ttft_metrics({0.1: 30, 5.0: 500}).splitlines() if 'le="1.0"' not in line)
    st.update(partial + "\n", None)  # 30 fast ones since; the 1.0 bucket missing from this scrape
    assert st.ttft_p95_s == pytest.approx(2.5 + 2.5 * 0.95) and st.fresh_ttft_p95() is None  # held; none counted yet
    assert set(st.ttft_buckets) == {*BOUNDS, float("inf")}  # the fleet's windows keep one layout
    now[0] = 20.0
    st.update(ttft_metrics({0.1: 60, 5.0: 500}), None)  # it is back: 60 fast ones since the slow ones
    assert st.ttft_p95_s == pytest.approx(0.095) and st.fresh_ttft_p95() == pytest.approx(0.095)
    now[0] = 30.0
    st.update(ttft_metrics({5.0: 40}), None)  # a real restart (counts below the last ones) still is one
    assert st.ttft_p95_s == pytest.approx(2.5 + 2.5 * 0.95)
    for t in (40.0, 100.0, 101.0):  # restarted without the 1.0 bucket for good: its layout after `hold_s`
        now[0] = t
        st.update("\n".join(x for x in ttft_metrics({0.1: 30, 5.0: 40}).splitlines() if 'le="1.0"' not in x), None)
    assert 1.0 not in st.ttft_buckets and st.ttft_p95_s is not None


# ---- the first scrape, and engines resetting on their own ------------------------------------------------------
def engines_metrics(counts_by_engine: dict[str, dict[float, int]]) -> str:
    """A data-parallel vLLM server's TTFT histogram: one series per engine (labels `engine`, `model_name`, as vLLM
    0.32 exports them), `counts` first tokens per bucket bound."""
    lines = ["# TYPE vllm:time_to_first_token_seconds histogram"]
    for engine, counts in counts_by_engine.items():  # engine "": no engine label (a server of one engine)
        label = f'engine="{engine}",' if engine else ""
        series = f'vllm:time_to_first_token_seconds_bucket{{{label}model_name="m",le='
        total = 0
        for b in BOUNDS:
            total += counts.get(b, 0)
            lines.append(f'{series}"{b}"}} {total}')
        lines.append(f'{series}"+Inf"}} {total}')
    return "\n".join(lines) + "\n"


def test_a_replicas_first_scrape_is_a_baseline_not_the_engines_history() -> None:
    """Found by review: a replica's first scrape counted everything its engine had served before as new (a replica
    joining the fleet, or restarted, in front of an engine that had served for hours): 500 slow first tokens of long
    ago were its held and fresh P95 (4.875 s), with 30 fast ones since. The first scrape is a baseline only, as
    Prometheus's rate() needs two samples: no P95 from it, and the buckets reported to the fleet start at zero."""
    from kvsched.adapters.ray.stats import ReplicaStats

    now = [0.0]
    st = ReplicaStats("http://x", clock=lambda: now[0], hold_s=60.0)
    st.update(ttft_metrics({5.0: 500}), None)  # hours of slow first tokens before this replica first read them
    assert st.ttft_p95_s is None and st.fresh_ttft_p95() is None
    assert st.ttft_buckets == dict.fromkeys((*BOUNDS, float("inf")), 0.0)
    now[0] = 10.0
    st.update(ttft_metrics({0.1: 30, 5.0: 500}), None)  # 30 fast ones since
    assert st.ttft_p95_s == pytest.approx(0.095) and st.fresh_ttft_p95() == pytest.approx(0.095)
    assert st.ttft_buckets[float("inf")] == 30


def test_one_engine_restarting_is_not_the_whole_replicas_counter_reset() -> None:
    """Found by review: under data parallelism the replica summed its engines' series before differencing, so one
    engine restarting (its counts dropping) read as the whole server's reset and every other engine's history
    counted as new: engine 0's 1000 slow first tokens of long ago made the fleet's P95 4.9 s and scaled the pool up,
    when the window held 30 fast ones. Each series resets on its own, as Prometheus's rate() takes them."""
    counts = [{"0": {5.0: 1000}, "1": {0.1: 1000}},
              {"0": {5.0: 1000, 0.1: 20}, "1": {0.1: 10}}]  # engine 1 restarted: 10 fast since; engine 0: 20 fast
    window = reports_of_text({"r0": [engines_metrics(c) for c in counts]})
    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=8, queue_per_replica=4.0, ttft_p95_s=2.0)
    n, state = policy(fleet_ctx(window, now=1000.0))
    assert n == 1 and "fleet p95 0.095 s" in state["kvsched_reason"] and "(30 first tokens)" in state["kvsched_reason"]



def test_a_poll_left_running_by_a_cancelled_caller_is_not_undone_by_the_next_one(monkeypatch: pytest.MonkeyPatch) \
        -> None:
    """Found by review: Ray cancels record_autoscaling_stats after 10 s; `asyncio.to_thread(stats.poll)` runs on, its
    lock released, and the next call polls beside it. The later poll applied first, then the earlier one (held up on
    /kvsched/sessions) applied its older counts: lower, so a reset, and the engine's 500 slow first tokens of before
    the baseline counted as new (a 4.9 s P95 from 10 fast first tokens). Polls run one at a time; one in flight makes
    the next return at once, the one in flight bringing the news."""
    import threading

    from kvsched.adapters.ray import stats as stats_module
    from kvsched.adapters.ray.stats import ReplicaStats

    engine = {"text": ttft_metrics({5.0: 500})}
    entered, release, hold = threading.Event(), threading.Event(), threading.Event()

    def get(url: str, headers: object, deadline: float) -> bytes:
        if url.endswith("/metrics"):
            return engine["text"].encode()
        if hold.is_set():
            hold.clear()
            entered.set()
            release.wait(30.0)  # a safety bound, not a timing: the test sets it
        return b'{"pinned_session_ids": []}'

    monkeypatch.setattr(stats_module, "get", get)
    st = ReplicaStats("http://x", hold_s=60.0)
    st.poll()  # the baseline: 500 slow first tokens of long ago
    engine["text"] = ttft_metrics({0.1: 10, 5.0: 500})
    hold.set()
    first = threading.Thread(target=st.poll)  # its caller cancelled: it runs on, held on /kvsched/sessions
    first.start()
    assert entered.wait(30.0)
    engine["text"] = ttft_metrics({0.1: 30, 5.0: 500})
    st.poll()  # the next call, while the first is in flight
    release.set()
    first.join(30.0)
    st.poll()
    assert st.ttft_buckets[float("inf")] == 30 and st.ttft_buckets[0.1] == 30
    assert st.fresh_ttft_p95() == pytest.approx(0.095)


def test_a_malformed_sessions_reply_keeps_the_scrape_and_the_last_session_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply of /kvsched/sessions cut short (http.client.IncompleteRead, not an OSError) raised out of poll(), so
    the /metrics scrape read before it was lost and Ray logged a failed stats call; now it is kept, as for a busy
    engine, with the last session list."""
    from kvsched.adapters.ray import stats as stats_module
    from kvsched.adapters.ray.stats import ReplicaStats

    engine: dict[str, Any] = {"text": ttft_metrics({0.1: 0}), "sessions": b'{"pinned_session_ids": ["a"]}'}

    def get(url: str, headers: object, deadline: float) -> bytes:
        if url.endswith("/metrics"):
            return str(engine["text"]).encode()
        if engine["sessions"] is None:
            raise http.client.IncompleteRead(b'{"pinned_sess')  # a reply cut short, as http.client raises it
        return bytes(engine["sessions"])

    monkeypatch.setattr(stats_module, "get", get)
    st = ReplicaStats("http://x", hold_s=60.0)
    st.poll()
    engine["text"], engine["sessions"] = ttft_metrics({0.1: 20}), None
    st.poll()
    assert st.ttft_buckets[float("inf")] == 20
    assert st.kv_sessions == ["a"]
