"""`kvsched bench router`: arguments, JSON shape and the behaviour its gates read, on a small fleet."""

from __future__ import annotations

import json

import pytest

from kvsched.bench.router import POLICIES, SimConfig, Workload, make_policy, simulate
from kvsched.cli import build_parser, main

METRICS = ("affinity", "max_over_mean_load", "moved_on_kill", "moved_on_scale_up", "route_us_p50")


def small(policy: str, seed: int = 0) -> dict:
    cfg = SimConfig(replicas=6, sessions=600, turns=6000, in_flight_per_replica=24, seed=seed)
    return simulate(make_policy(policy, cfg), cfg, Workload.build(cfg))


def test_cli_writes_every_policy_with_every_metric(tmp_path) -> None:
    out = tmp_path / "router.json"
    main(["bench", "router", "--quick", "--replicas", "4", "--sessions", "300", "--turns", "3000",
          "--out", str(out)])
    data = json.loads(out.read_text())
    for p in POLICIES:
        assert all(isinstance(data[p][m], float) for m in METRICS), data[p]
    assert data["headline_replicas"] == 4 and set(data["by_replicas"]) == {"4"}
    assert data["provenance"]["command"].startswith("kvsched")
    assert all(isinstance(v, bool) for v in data["gates"].values())


def test_quick_defaults() -> None:
    args = build_parser().parse_args(["bench", "router", "--quick"])
    assert args.quick and args.replicas is None and args.load_factor == 1.25


def test_kvsched_kill_moves_only_the_dead_replicas_sessions_and_they_come_back() -> None:
    kr = small("kvsched")["kill_return"]
    assert kr["dead_replica_sessions"] > 0 and kr["others_moved_on_kill"] == 0
    assert kr["dead_replica_sessions_back_home"] == 1.0 and kr["others_moved_on_return"] == 0
    # changed on purpose (found by review): those that ran a turn where they failed over to stay with that KV
    assert kr["dead_replica_sessions_kept_with_newer_kv"] == 1.0


def test_consistent_hash_on_unique_ids_does_not_bring_sessions_back() -> None:
    kr = small("consistent_hash")["kill_return"]
    assert kr["others_moved_on_kill"] == 0 and kr["dead_replica_sessions_back_home"] < 0.5


def test_kvsched_bounds_the_load_that_consistent_hashing_lets_skew() -> None:
    k, ch, p2 = small("kvsched"), small("consistent_hash"), small("pow2")
    assert k["max_over_mean_load"] < ch["max_over_mean_load"]
    assert k["affinity"] > p2["affinity"]


def test_simulation_is_deterministic_for_a_seed() -> None:
    a, b = small("kvsched", seed=3), small("kvsched", seed=3)
    a.pop("route_us_p50"), b.pop("route_us_p50"), a.pop("route_us_p99"), b.pop("route_us_p99")
    assert a == b


def test_bad_sim_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        SimConfig(replicas=1)


def test_real_run_summary_counts_affinity_load_and_failures_from_turns() -> None:
    from kvsched.bench.loadgen import Turn, summarize
    from kvsched.bench.router import real_gates

    turns = [Turn("a", 0, 0.0, "ok", "slot-0"), Turn("a", 1, 1.0, "ok", "slot-0"), Turn("a", 2, 2.0, "ok", "slot-1"),
             Turn("b", 0, 0.1, "ok", "slot-1"), Turn("b", 1, 1.1, "failed"), Turn("b", 2, 2.1, "ok", "slot-1", attempts=2),
             Turn("b", 3, 3.1, "cut", "slot-1")]
    s = summarize(turns)
    assert (s["follow_ups"], s["affinity"], s["moves"]) == (3, 2 / 3, {"total": 1})
    assert s["requests_per_replica"] == {"slot-0": 2, "slot-1": 3} and s["max_over_mean_load"] == 3 / 2.5
    assert (s["requests"], s["failed"], s["cut_streams"], s["retried"]) == (7, 1, 1, 1)
    gates = real_gates({"policies": {"kvsched": s}, "kill": s | {"orphans_after_10s": [], "recovery_s": 80.0}}, 1.25)
    assert gates == {"real_kvsched_affinity_ge_0.95": False, "real_kvsched_max_over_mean_le_1.25": True,
                     "kill_no_failed_requests": False, "kill_no_orphaned_process_after_10s": True,
                     "kill_replacement_serves_its_slot_again": True}


def test_load_runs_past_their_duration_until_enough_turns_are_answered_but_not_past_the_hard_stop() -> None:
    from kvsched.bench.loadgen import Stopper

    s = Stopper(stop_at=10.0, min_answered=3, hard_stop_at=30.0)
    assert not s.over(9.9)
    assert s.over(10.0) is False  # 0 of 3 answered: go on
    for _ in range(3):
        s.count_answered()
    assert s.answered == 3 and s.over(10.0)
    slow = Stopper(stop_at=10.0, min_answered=100, hard_stop_at=30.0)
    assert not slow.over(29.9) and slow.over(30.0)
    assert Stopper(stop_at=10.0).over(10.0)  # no minimum: the duration alone
    moved = Stopper(stop_at=10.0, min_answered=100, hard_stop_at=5.0)  # a hard stop never cuts the duration short
    assert not moved.over(9.0) and moved.over(10.0)


def test_ray_routers_are_driven_as_ray_ships_them() -> None:
    """The baselines are Ray's own classes: the consistent-hash ring is keyed on replica unique ids (a returning
    replica is a new id, so its sessions mostly do not come back), pow2 samples two replicas per request."""
    from kvsched.bench.router_policies import RayRouterPolicy
    from kvsched.core.routing_ring import slot_name

    slots = [slot_name(i) for i in range(4)]
    ch = RayRouterPolicy("consistent_hash", max_ongoing=8, seed=0)
    try:
        ch.set_live(slots)
        sessions = [f"s{i}" for i in range(400)]
        before = {s: ch.peek(s, None) for s in sessions}
        assert len(set(before.values())) == 4 and all(ch.peek(s, None) == before[s] for s in sessions)
        assert ch.route("s0", {before["s0"]: 8}, None) != before["s0"]  # the primary is full: a fallback
        ch.set_live(slots, revived=slots[1])
        after = {s: ch.peek(s, None) for s in sessions}
        owned = [s for s in sessions if before[s] == slots[1]]
        assert sum(after[s] == slots[1] for s in owned) < len(owned) / 2
    finally:
        ch.close()


def test_the_migration_sides_deploy_with_compaction_and_their_store():
    from kvsched.adapters.ray.config import parse_config
    from kvsched.bench.router_migration import side_configs

    cfg = parse_config({"pools": [{"name": "tiny", "model": "kvsched-tiny:test", "replicas": 1}]})
    one, two = side_configs(cfg, "redis://127.0.0.1:6379/0")
    assert [p.replicas for p in one.pools] == [1] and [p.replicas for p in two.pools] == [2]
    env = two.pools[0].engine.env
    assert env["KVSCHED_STORE_URL"] == "redis://127.0.0.1:6379/0"
    assert env["KVSCHED_COMPACTION_CLIENT_STRATEGIES"] == "summarize"  # the agents' X-KVSched-Compaction is allowed
    assert "--enable-prompt-tokens-details" in two.pools[0].engine.vllm_args
    assert "KVSCHED_STORE_URL" not in side_configs(cfg, None)[0].pools[0].engine.env
    assert cfg.pools[0].engine.env == {}  # the parsed config is left as it was


def test_the_migration_chart_is_written_from_the_result(tmp_path):
    from kvsched.bench.router_migration import EVENTS, migration_chart

    side = lambda scale: {"by_event": {e: {"next_turn_prefill_tokens": scale * (i + 1)}  # noqa: E731
                                       for i, e in enumerate(EVENTS)}}
    png = migration_chart({"without_shared": side(1000), "with_shared": side(100)}, tmp_path / "m.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def _chart(monkeypatch, tmp_path, result):
    """router_chart's figure, kept open instead of saved."""
    from kvsched.bench import router_plot

    figs = []
    monkeypatch.setattr(router_plot, "save_figure", lambda fig, path: figs.append(fig) or path)
    router_plot.router_chart(result, tmp_path / "r.png")
    return figs[0]


def _sim_row(load_factor):
    point = {"max_over_mean_load": 1.1, "affinity": 0.97}
    return {"config": {"load_factor": load_factor}, **{p: point for p in POLICIES}}


def test_the_router_chart_draws_a_kill_that_never_happened(monkeypatch, tmp_path):
    """Found by review: kill_at_s None (the kill failed) raised TypeError in axvline after the JSON was written."""
    kill = {"kill_at_s": None, "recovery_s": None, "error": "StopIteration: no slot 0",
            "timeline": [[1.0, "slot-0", "ok", 1], [2.0, None, "failed", 1]]}
    result = {"by_replicas": {"8": _sim_row(1.25)},
              "real_2_replicas": {"policies": {"kvsched": {"max_over_mean_load": 1.02, "affinity": 0.99}},
                                  "kill": kill}}
    fig = _chart(monkeypatch, tmp_path, result)
    assert any("no kill happened" in t.get_text() for t in fig.axes[-1].texts)


def test_the_router_chart_puts_simulated_and_real_load_on_their_own_axes_and_the_runs_bound(monkeypatch, tmp_path):
    """Found by review: one x-axis mixed simulated turn-seconds with real request counts, and the bound line was drawn
    at 1.25 whatever --load-factor said."""
    result = {"by_replicas": {"8": _sim_row(1.5)},
              "real_2_replicas": {"policies": {"kvsched": {"max_over_mean_load": 1.02, "affinity": 0.99}}}}
    fig = _chart(monkeypatch, tmp_path, result)
    sim, real = fig.axes
    assert "turn-seconds" in sim.get_xlabel() and "requests" in real.get_xlabel()
    assert [line.get_xdata()[0] for line in sim.lines if line.get_xdata()[0] == line.get_xdata()[-1]] == [1.5]


def test_the_migration_prefill_gate_compares_the_moves_both_sides_made():
    """Found by review: the gate summed 16 moves without the shared level (kill and restart) against 8 with it (kill
    only): twice the moves on the side it had to beat."""
    from kvsched.bench.router_migration import EVENTS, _summary, gates

    def side(per_event: dict[str, int]) -> dict:
        moves = {e: [{"sid": f"s{i}", "prefill": per_event.get(e, 0), "prompt": 2000, "ttft_s": 0.5,
                      "was_compacted": True, "compacted": True} for i in range(8 if e in per_event else 0)]
                 for e in EVENTS}
        flat = [m for e in EVENTS for m in moves[e]]
        return _summary(flat, 0) | {"moves": {e: [[m["sid"], m["prefill"], m["prompt"], m["ttft_s"]] for m in ms]
                                              for e, ms in moves.items()}}

    out = {"with_shared": side({"kill": 400}), "without_shared": side({"kill": 1000, "restart": 1000})}
    g = gates(out)
    assert out["matched"] == {"moves": 8, "with_shared_prefill": 3200, "without_shared_prefill": 8000,
                              "unmatched": {"with_shared": 0, "without_shared": 8}}
    assert not g["prefill_with_shared_le_0.3x_without_on_matched_moves"]  # 3200 > 0.3 x 8000 (3200 <= 0.3 x 16000)
    assert out["with_shared"]["next_turn_ttft_n"] == 8
    out = {"with_shared": side({"kill": 200}), "without_shared": side({"kill": 1000, "restart": 1000})}
    assert gates(out)["prefill_with_shared_le_0.3x_without_on_matched_moves"]


class _FakeChat:
    """An OpenAI client whose streamed answer is `reply`; records every request's arguments."""

    def __init__(self, reply: str) -> None:
        from types import SimpleNamespace as NS

        self.sent: list[dict] = []
        self.chat = NS(completions=NS(with_raw_response=NS(create=self._create)))
        self._chunks = [NS(choices=[NS(delta=NS(content=reply))], usage=None),
                        NS(choices=[], usage=NS(prompt_tokens=100, prompt_tokens_details=NS(cached_tokens=0)))]

    def _create(self, **kw):
        from types import SimpleNamespace as NS

        self.sent.append({**kw, "messages": [dict(m) for m in kw["messages"]]})
        return NS(headers={"x-kvsched-replica-id": "r1"}, parse=lambda: iter(self._chunks))


def test_every_side_is_sent_the_same_prompts_whatever_the_model_answers():
    """Found by review: the load generator and the migration scenario kept the tiny model's reply (sampled at
    temperature 1, unseeded) in the history, so the routers and sides compared were sent different prompts."""
    import random

    from kvsched.bench.loadgen import LoadConfig, run_session
    from kvsched.bench.router_migration import Session, _turn

    class Turns:  # stops after three turns
        calls = 0

        def over(self, t):
            self.calls += 1
            return self.calls > 3

        def count_answered(self):
            pass

    sent = []
    for reply in ("a b c", "something else entirely"):
        client = _FakeChat(reply)
        run_session(client, "wf0/worker-0", LoadConfig(turn_period_s=0.0), 0.0, Turns())
        sent.append(client.sent)
    assert len(sent[0]) == 3 and sent[0] == sent[1]
    assert all(kw["temperature"] == 0.0 for kw in sent[0])
    histories = []
    for reply in ("a b c", "something else entirely"):
        client = _FakeChat(reply)
        s = Session("mig0/worker-0", random.Random("0/0"), [{"role": "system", "content": "x"}])
        for turn in range(3):
            _turn(client, s, turn)
        histories.append(s.messages)
    assert histories[0] == histories[1] and len(histories[0]) == 7


def test_a_consistent_hash_ring_bounded_like_kvsched_runs_beside_the_4x_one(monkeypatch) -> None:
    """Found by review: the ring's fallback fired only at 4x the mean in flight, so it was rarely bounded; a ring with
    max_ongoing_requests at the load factor x the mean runs in the same run."""
    from kvsched.bench import router_policies

    cfg = SimConfig(replicas=6, sessions=600, turns=6000, in_flight_per_replica=24)
    built = {}
    real_make = router_policies.make_policy

    def spy(name, load_factor, max_ongoing, seed):
        built[name] = max_ongoing
        return real_make(name, load_factor, max_ongoing, seed)

    monkeypatch.setattr(router_policies, "make_policy", spy)
    for name in ("consistent_hash_bounded", "consistent_hash"):
        make_policy(name, cfg, mean_in_flight=10.0).close()
    assert "consistent_hash_bounded" in POLICIES and built == {"consistent_hash_bounded": 12, "consistent_hash": 96}
    monkeypatch.undo()
    carried = small("kvsched")["mean_in_flight_per_replica"]
    assert 0 < carried < 24  # one turn in flight per session: below the configured mean
    cfg = SimConfig(replicas=6, sessions=600, turns=6000, in_flight_per_replica=24)
    runs: dict = {}
    for name in ("kvsched", "consistent_hash_bounded", "consistent_hash"):  # as run_benchmark: kvsched's mean first
        policy = make_policy(name, cfg, runs.get("kvsched", {}).get("mean_in_flight_per_replica"))
        runs[name] = simulate(policy, cfg, Workload.build(cfg))
        policy.close()
    assert runs["consistent_hash_bounded"]["max_over_mean_load"] < runs["consistent_hash"]["max_over_mean_load"]
