"""The Ray adapter without a cluster: config loading, replica stats, the request router with fake replicas, the
autoscaling policy and the reaper."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvsched.adapters.ray.config import ConfigError, config_from_dict, load_config, parse_config
from kvsched.adapters.ray.stats import ReplicaStats, histogram_quantile
from kvsched.cli import main
from kvsched.core.routing_ring import HashRing, slot_name

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "ray"
POOL = {"name": "w", "model": "/m"}


# ---- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "agents-gpu.yaml"])
def test_example_configs_load_and_survive_the_trip_to_replicas(name: str) -> None:
    cfg = load_config(EXAMPLES / name)
    assert config_from_dict(cfg.to_dict()) == cfg
    cfg.routing()


def test_gpu_pools_default_to_one_gpu_and_cpu_pools_to_none() -> None:
    cfg = parse_config({"pools": [dict(POOL, device="gpu"), dict(POOL, name="c")]})
    assert [p.num_gpus for p in cfg.pools] == [1.0, 0.0]


@pytest.mark.parametrize("raw, key", [
    ({"pools": []}, "pools"),
    ({"pools": [POOL], "colour": 1}, "colour"),
    ({"pools": [{"name": "w"}]}, "model"),
    ({"pools": [dict(POOL, device="tpu")]}, "device"),
    ({"pools": [dict(POOL, num_gpus=1)]}, "num_gpus"),
    ({"pools": [dict(POOL, replicas=0)]}, "replicas"),
    ({"pools": [dict(POOL, replicas=True)]}, "replicas"),
    ({"pools": [dict(POOL, max_model_len="8k")]}, "max_model_len"),
    ({"pools": [dict(POOL, autoscaling={"max_replicas": 0})]}, "max_replicas"),
    ({"pools": [dict(POOL, autoscaling={"target": 3})]}, "target"),
    ({"pools": [POOL], "router": {"load_factor": 0.9}}, "load_factor"),
    ({"pools": [POOL], "long_context_tokens": 1000}, "long_context"),
    ({"pools": [POOL, POOL]}, "unique"),
    ({"pools": [POOL], "http": {"port": "80"}}, "port"),
])
def test_bad_config_is_a_config_error_naming_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        parse_config(raw)


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(bad)


def test_ray_serve_dry_run_and_bad_config_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ray-serve", str(EXAMPLES / "tiny-cpu.yaml"), "--dry-run"]) == 0
    assert "pool tiny" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools: [{name: w}]\n")
    assert main(["ray-serve", str(bad), "--dry-run"]) == 2
    assert "model" in capsys.readouterr().err


def test_app_builder_wires_the_router_and_autoscaling_policy() -> None:
    from kvsched.adapters.ray.app import ROUTER_PATH, engine_options

    cfg = load_config(EXAMPLES / "agents-gpu.yaml")
    workers = next(p for p in cfg.pools if p.name == "workers")
    opts = engine_options(workers, cfg)
    assert opts["request_router_config"].request_router_class == ROUTER_PATH
    assert opts["request_router_config"].request_router_kwargs["load_factor"] == 1.25
    assert opts["request_router_config"].request_router_kwargs["load_floor"] == 16
    auto = opts["autoscaling_config"]
    assert (auto.min_replicas, auto.max_replicas) == (2, 8) and "num_replicas" not in opts
    assert auto.policy.policy_kwargs["queue_per_replica"] == 4
    assert opts["ray_actor_options"]["num_gpus"] == 1.0


# ---- replica stats ---------------------------------------------------------------------------------------------
def metrics(buckets: dict[str, float], waiting: float = 0) -> str:
    lines = [f"vllm:num_requests_waiting{{engine=\"0\"}} {waiting}"]
    lines += [f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="{le}"}} {c}' for le, c in buckets.items()]
    return "\n".join(lines)


def test_histogram_quantile_interpolates_inside_the_bucket() -> None:
    assert histogram_quantile({0.1: 0, 0.5: 100, float("inf"): 100}, 0.5) == pytest.approx(0.3)
    assert histogram_quantile({0.1: 0, float("inf"): 0}, 0.95) is None


def test_replica_stats_use_recent_ttft_and_list_pinned_sessions() -> None:
    now = [0.0]
    st = ReplicaStats("http://x", hold_s=10, clock=lambda: now[0])
    st.update(metrics({"0.1": 90, "1.0": 100, "+Inf": 100}, waiting=3),
              {"sessions": [{"session_id": "a", "pinned_blocks": 2}, {"session_id": "b", "pinned_blocks": 0}]})
    assert st.queue_depth == 3 and st.kv_sessions == ["a"] and st.ttft_p95_s == pytest.approx(0.55)
    # the next window: 20 new requests, all slower than 1 s; the old fast ones no longer count
    now[0] = 5
    st.update(metrics({"0.1": 90, "1.0": 100, "+Inf": 120}), None)
    assert st.ttft_p95_s == pytest.approx(1.0) and st.kv_sessions == ["a"]
    now[0] = 8
    st.update(metrics({"0.1": 90, "1.0": 100, "+Inf": 120}), None)
    assert st.ttft_p95_s == pytest.approx(1.0)  # nothing new: held
    now[0] = 30  # nothing new for longer than hold_s: no signal rather than a stale one
    st.update(metrics({"0.1": 90, "1.0": 100, "+Inf": 120}), None)
    assert st.ttft_p95_s is None


# ---- the request router with fake replicas ---------------------------------------------------------------------
def fake_replica(uid: str, stats: dict | None = None, metadata: dict | None = None):  # noqa: ANN201
    from ray.serve._private.test_utils import FakeRunningReplica

    class Replica(FakeRunningReplica):
        @property
        def routing_stats(self) -> dict:
            return stats or {}

        @property
        def replica_metadata(self) -> dict:
            return metadata or {}

    return Replica(uid)


def pending(sid: str, rid: str):  # noqa: ANN201
    from ray.serve._private.common import RequestMetadata
    from ray.serve._private.request_router.common import PendingRequest

    return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id=rid, internal_request_id=rid,
                                                                       session_id=sid))


def new_router():  # noqa: ANN201
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    from kvsched.adapters.ray.router import KVSchedRequestRouter

    r = KVSchedRequestRouter(deployment_id=DeploymentID(name="engine"), handle_source=DeploymentHandleSource.UNKNOWN)
    r.initialize_state(load_factor=1.25)
    return r


def sessions_by_home(n_slots: int = 2, per_slot: int = 3) -> dict[str, list[str]]:
    ring = HashRing([slot_name(i) for i in range(n_slots)])
    out: dict[str, list[str]] = {slot_name(i): [] for i in range(n_slots)}
    i = 0
    while any(len(v) < per_slot for v in out.values()):
        sid = f"wf{i}/worker"
        home = ring.owner(sid)
        assert home is not None
        if len(out[home]) < per_slot:
            out[home].append(sid)
        i += 1
    return out


def test_router_sends_sessions_to_the_replica_in_their_reported_slot_even_after_replacement() -> None:
    async def run() -> None:
        r = new_router()
        a, b = fake_replica("aaa", {"slot": 0}), fake_replica("bbb", {"slot": 1})
        r.update_replicas([a, b])
        homes = sessions_by_home()
        for slot, sids in homes.items():
            for sid in sids:
                ranks = await r.choose_replicas([a, b], pending(sid, sid))
                assert r.slot_of(ranks[0][0].replica_id) == slot
        # replica in slot-1 dies; its sessions go to slot-0
        r.on_replica_actor_died(b.replica_id)
        for sid in homes[slot_name(1)]:
            ranks = await r.choose_replicas([a], pending(sid, sid + "-2"))
            assert ranks[0][0] is a
            r._assigned(pending(sid, sid + "-2"), a.replica_id)
            r.on_request_completed(a.replica_id, sid + "-2")
        # a replacement with a NEW unique id reports slot 1 (its rank) and takes them back
        c = fake_replica("ccc", metadata={"slot": 1})
        r.update_replicas([a, c])
        for sid in homes[slot_name(1)]:
            assert (await r.choose_replicas([a, c], pending(sid, sid + "-3")))[0][0] is c

    asyncio.run(run())


def test_router_prefers_the_replica_reporting_the_sessions_kv_and_bounds_load() -> None:
    async def run() -> None:
        r = new_router()
        sid = sessions_by_home()[slot_name(0)][0]
        a, b = fake_replica("aaa", {"slot": 0}), fake_replica("bbb", {"slot": 1, "kv_sessions": [sid]})
        r.update_replicas([a, b])
        assert (await r.choose_replicas([a, b], pending(sid, "r0")))[0][0] is b
        for i in range(3):  # three requests in flight on b, none on a: b is over the bound for one more
            r._assigned(pending(f"x{i}", f"x{i}"), b.replica_id)
        assert r.loads() == {slot_name(1): 3}
        assert (await r.choose_replicas([a, b], pending(sid, "r1")))[0][0] is a
        for i in range(3):
            r.on_request_completed(b.replica_id, f"x{i}")
        assert (await r.choose_replicas([a, b], pending(sid, "r2")))[0][0] is b

    asyncio.run(run())


def test_router_without_slot_reports_assigns_lowest_free_slots_and_sessionless_goes_least_loaded() -> None:
    async def run() -> None:
        r = new_router()
        a, b = fake_replica("aaa"), fake_replica("bbb")
        r.update_replicas([a, b])
        assert {r.slot_of(a.replica_id), r.slot_of(b.replica_id)} == {slot_name(0), slot_name(1)}
        r._assigned(pending("", "q"), a.replica_id)
        assert (await r.choose_replicas([a, b], pending("", "n")))[0][0] is b


def test_router_offers_other_replicas_only_after_the_home_only_tries() -> None:
    from kvsched.adapters.ray.router import HOME_ONLY_ATTEMPTS

    async def run() -> None:
        r = new_router()
        a, b = fake_replica("aaa", {"slot": 0}), fake_replica("bbb", {"slot": 1})
        r.update_replicas([a, b])
        sid = sessions_by_home()[slot_name(0)][0]
        for _ in range(HOME_ONLY_ATTEMPTS):  # a slow queue-length probe does not move the session at once
            assert await r.choose_replicas([a, b], pending(sid, "t")) == [[a]]
        assert await r.choose_replicas([a, b], pending(sid, "t")) == [[a], [b]]
        r._assigned(pending(sid, "t"), b.replica_id)  # Ray sent it to b: the session's KV is there now
        assert (await r.choose_replicas([a, b], pending(sid, "t2")))[0] == [b]

    asyncio.run(run())


# ---- autoscaling policy ----------------------------------------------------------------------------------------
def test_autoscaling_policy_reads_replica_reported_queue_and_ttft() -> None:
    from kvsched.adapters.ray.autoscaling import QueueTTFTPolicy

    policy = QueueTTFTPolicy(min_replicas=1, max_replicas=6, queue_per_replica=2, ttft_p95_s=1.0)
    ctx = SimpleNamespace(aggregated_metrics={"queue_depth": {"r1": 6.0, "r2": 6.0}, "ttft_p95_s": {"r1": -1.0}},
                          running_replicas=["r1", "r2"], target_num_replicas=2, current_time=10.0, policy_state={})
    n, state = policy(ctx)
    assert n == 6 and "queue" in state["kvsched_reason"]
    ctx.aggregated_metrics = {"queue_depth": {"r1": 0.0, "r2": 0.0}, "ttft_p95_s": {"r1": 3.0, "r2": -1.0}}
    assert policy(ctx)[0] == 6


# ---- reaper ----------------------------------------------------------------------------------------------------
def test_reaper_stops_the_whole_group_when_its_parent_dies(tmp_path: Path) -> None:
    """A parent (a shell) starts a group of two sleepers (leader and a grandchild, like vLLM's API server and engine
    core) and the reaper, then is SIGKILLed together with the leader: the orphaned grandchild must go too."""
    from kvsched.adapters.ray.reaper import group_alive

    script = tmp_path / "parent.sh"
    pidfile = tmp_path / "group.pid"
    script.write_text(f"setsid bash -c 'sleep 300 & sleep 300' & echo $! > {pidfile}\n"
                      f"while [ ! -s {pidfile} ]; do sleep 0.05; done\n"
                      f"{sys.executable} -m kvsched.adapters.ray.reaper $(cat {pidfile}) $$\n"
                      "sleep 300\n")
    parent = subprocess.Popen(["bash", str(script)], start_new_session=True)
    pgid = 0
    try:
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        pgid = int(pidfile.read_text())
        time.sleep(1.0)  # the reaper is watching
        os.killpg(parent.pid, signal.SIGKILL)  # like Ray: the worker and its direct children
        os.kill(pgid, signal.SIGKILL)  # the group leader (vLLM's API server) dies; its child is orphaned
        parent.wait()
        assert group_alive(pgid)
        deadline = time.monotonic() + 15
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(pgid), "the reaper left the orphaned group member running"
    finally:
        for target in (parent.pid, pgid):
            try:
                if target:
                    os.killpg(target, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_reaper_rejects_bad_arguments() -> None:
    from kvsched.adapters.ray.reaper import main as reaper_main

    assert reaper_main(["reaper"]) == 2 and reaper_main(["reaper", "1", "x"]) == 2


# ---- ingress stream relay --------------------------------------------------------------------------------------
class FakeEngineStream:
    """An engine replica's streaming generator: yields `chunks`, then raises `fail` (or ends, or hangs)."""

    def __init__(self, chunks: list[bytes], fail: BaseException | None = None, hang: bool = False) -> None:
        self.chunks, self.fail, self.hang, self.cancelled = list(chunks), fail, hang, False

    def __aiter__(self) -> FakeEngineStream:
        return self

    async def __anext__(self) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


async def collect(gen: FakeEngineStream, idle_timeout_s: float = 5.0) -> list[bytes]:
    from kvsched.adapters.ray.ingress import relay

    return [c async for c in relay(gen, 0, idle_timeout_s)]


@pytest.mark.parametrize("fail", [RuntimeError("actor died"), asyncio.CancelledError()])
def test_relay_ends_a_stream_whose_engine_fails_midway_with_an_error_event(fail: BaseException) -> None:
    gen = FakeEngineStream([b"data: 1\n\n"], fail=fail)
    out = asyncio.run(collect(gen))
    assert out[0] == b"data: 1\n\n" and len(out) == 2
    assert b"failed during the stream" in out[1] and type(fail).__name__.encode() in out[1]
    assert not gen.cancelled  # the engine side is already gone


def test_relay_passes_a_whole_stream_on_and_an_idle_engine_times_out_with_an_error() -> None:
    assert asyncio.run(collect(FakeEngineStream([b"a", b"b"]))) == [b"a", b"b"]
    out = asyncio.run(collect(FakeEngineStream([b"a"], hang=True), idle_timeout_s=0.05))
    assert out[0] == b"a" and b"TimeoutError" in out[1]


def test_relay_cancelled_by_the_client_cancels_the_engine_generation() -> None:
    gen = FakeEngineStream([b"a"], hang=True)

    async def consume_then_cancel() -> None:
        from kvsched.adapters.ray.ingress import relay

        async def consume() -> None:
            async for _ in relay(gen, 0, 3600):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(consume_then_cancel())
    assert gen.cancelled
