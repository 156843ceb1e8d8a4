"""kvsched on a local Ray Serve cluster: two CPU engine replicas of the tiny model (real `vllm serve --scheduler
kvsched` children) behind the OpenAI ingress. One shared cluster; the tests run in file order."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.integration

MARK = f"tiny-raytest-{uuid.uuid4().hex[:8]}"  # served-model-name of this run's vLLM children: finds them in ps


def command_lines() -> dict[int, str]:
    """Every process's full command line (from /proc: `ps` cuts lines to $COLUMNS, which pytest sets)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                pass
    return out


def our_vllm_pids() -> list[int]:
    """This run's `vllm serve` API servers (their served-model-name is MARK); each leads its own process group."""
    pids = [pid for pid, cmd in command_lines().items() if MARK in cmd and " serve " in cmd]
    GROUPS.update(pids)
    return pids


GROUPS: set[int] = set()  # every vLLM process group this run has seen


def group_members(pgids: set[int]) -> list[int]:
    """Processes still in any of these groups: the API servers and their engine cores and workers."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) in pgids:
                out.append(int(entry))
    return out


def wait_until(cond: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    tree = "\n".join(f"{pid} {cmd[:150]}" for pid, cmd in command_lines().items()
                     if any(k in cmd for k in ("vllm", "reaper", "Serve")))
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}; processes:\n{tree}")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Any) -> Iterator[dict[str, Any]]:
    import ray
    from ray import serve

    from kvsched.adapters.ray.app import build_app
    from kvsched.adapters.ray.config import parse_config
    from kvsched.serving import free_port

    port = free_port()
    cfg = parse_config({
        "http": {"host": "127.0.0.1", "port": port},
        "router": {"stats_period_s": 1},
        "health_check_period_s": 1,
        "pools": [{"name": "tiny", "model": str(tiny_model_dir), "models": ["tiny"], "served_model_name": MARK,
                   "replicas": 2, "num_cpus": 0, "max_model_len": 512, "block_size": 32, "kv_cache_gib": 1,
                   "max_ongoing_requests": 16}],
    })
    cfg = dataclasses.replace(cfg, request_retries=3)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(cfg), name="kvsched", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}/v1", "base": f"http://127.0.0.1:{port}"}
    finally:
        serve.shutdown()
        ray.shutdown()
        our_vllm_pids()
        left = []
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and (left := group_members(GROUPS)):
            time.sleep(0.5)
        for pgid in GROUPS:  # do not leak into the rest of the session, but fail (as a teardown error)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"vLLM processes left running after serve.shutdown: {left}"


def client(cluster: dict[str, Any]) -> Any:
    import openai

    return openai.OpenAI(base_url=cluster["url"], api_key="unused", max_retries=0, timeout=120)


def turn(cluster: dict[str, Any], sid: str, text: str = "tool result: 42 rows", max_tokens: int = 4) -> tuple[str, str]:
    raw = client(cluster).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
        extra_headers={"X-Session-Id": sid})
    assert raw.parse().choices[0].message.content is not None
    return raw.headers["x-kvsched-replica"], raw.headers["x-kvsched-replica-id"]


def homes() -> dict[str, list[str]]:
    from kvsched.core.routing_ring import HashRing, slot_name

    ring = HashRing([slot_name(0), slot_name(1)])
    out: dict[str, list[str]] = {"slot-0": [], "slot-1": []}
    i = 0
    while min(len(v) for v in out.values()) < 3:
        sid = f"wf{i}/worker"
        out[str(ring.owner(sid))].append(sid)
        i += 1
    return {k: v[:3] for k, v in out.items()}


def test_sessions_stick_to_their_home_replica_over_http(cluster: dict[str, Any]) -> None:
    by_home = homes()
    for _ in range(3):
        for slot, sids in by_home.items():
            for sid in sids:
                assert turn(cluster, sid)[0] == slot
    sid = by_home["slot-1"][0]
    stream = client(cluster).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "stream it"}], max_tokens=6, stream=True,
        extra_headers={"X-Session-Id": sid})
    assert stream.headers["x-kvsched-replica"] == "slot-1"
    assert sum(1 for c in stream.parse() if c.choices) >= 1


def test_bad_input_gets_4xx_with_a_message(cluster: dict[str, Any]) -> None:
    import openai

    with pytest.raises(openai.NotFoundError, match="not served"):
        client(cluster).chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="session id"):
        client(cluster).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                extra_headers={"X-Session-Id": "s" * 200})


def test_killed_replica_fails_its_stream_clearly_then_its_sessions_move_and_come_back(cluster: dict[str, Any]) -> None:
    import openai
    import ray

    by_home = homes()
    victim_sid, other_sid = by_home["slot-0"][0], by_home["slot-1"][0]
    _, victim_id = turn(cluster, victim_sid)
    survivor = turn(cluster, other_sid)
    before = set(our_vllm_pids())
    stream = client(cluster).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "go"}], max_tokens=480, stream=True,
        extra_headers={"X-Session-Id": victim_sid}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True) if victim_id in a["name"])
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    t0 = time.monotonic()
    with pytest.raises(openai.APIError, match="failed during the stream"):
        for _ in chunks:
            pass
    assert time.monotonic() - t0 < 60  # an error, not a hang
    # the dead replica's session works at once on the survivor; the survivor's session did not move
    assert turn(cluster, victim_sid)[0] == "slot-1"
    assert turn(cluster, other_sid) == survivor
    # the killed replica's vLLM processes (API server, engine core, worker) are reaped
    wait_until(lambda: (gone := before - set(our_vllm_pids())) and not group_members(gone), 60,
               "the dead replica's vllm process group to exit")
    # Ray replaces the replica in the same slot (its rank): the session goes home again
    wait_until(lambda: turn(cluster, victim_sid)[0] == "slot-0", 240, "the replacement to take slot-0 back")
    assert turn(cluster, other_sid)[0] == "slot-1"


def test_one_vllm_child_per_live_replica(cluster: dict[str, Any]) -> None:
    """After the kill and replacement: two replicas, two vLLM process groups (none left behind). The fixture's
    teardown then checks that no process of any group this run saw is left after the app shuts down."""
    wait_until(lambda: len(our_vllm_pids()) == 2, 30, "exactly two vllm children")
    live = set(our_vllm_pids())
    assert not group_members(GROUPS - live)
