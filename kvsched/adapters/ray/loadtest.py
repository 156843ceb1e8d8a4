"""A real routing comparison on this machine: a local Ray cluster, two CPU engine replicas of the tiny model
(`vllm serve --scheduler kvsched` each), the same seeded agent sessions sent through the OpenAI ingress once per
router: kvsched's (default, and with `load_floor: 8`), Ray's experimental ConsistentHashRouter, Ray's default
power-of-two-choices.

Each session is a conversation whose history grows by a tool result every turn (the KV worth keeping); all sessions
run at once, one thread each, turns in order within a session. Reported per router: `affinity` (follow-up turns served by the replica that served the session's previous turn, where its KV is),
`max_over_mean_load` (requests per replica), follow-up TTFT (client side, streaming, first content chunk) and errors.
The tiny model's outputs are noise; its timings are CPU timings of a 2-layer model, not GPU figures.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvsched.bench.common import percentile

# kvsched as configured by default (the bound alone), kvsched with a floor of 8 requests per replica, Ray's two.
ROUTERS = ("kvsched", "kvsched_floor8", "consistent_hash", "pow2")


def _tool_result(rng: random.Random, turn: int) -> str:
    rows = " ".join(f"row{rng.randrange(1000)}={rng.randrange(10**6)}" for _ in range(24))
    return f"tool result {turn}: {rows}"


def _session(client: Any, sid: str, system: str, turns: int, seed: int) -> list[tuple[str, float | None]]:
    """One session's turns in order: (slot that served it or "error", TTFT in ms)."""
    import openai

    rng = random.Random(f"{seed}/{sid}")
    msgs = [{"role": "system", "content": system}]
    out: list[tuple[str, float | None]] = []
    for turn in range(turns):
        msgs.append({"role": "user", "content": _tool_result(rng, turn)})
        t0 = time.perf_counter()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model="tiny", messages=msgs, max_tokens=8, stream=True, extra_headers={"X-Session-Id": sid})
            slot = raw.headers.get("x-kvsched-replica", "?")
            first: float | None = None
            text = []
            for chunk in raw.parse():
                if chunk.choices and chunk.choices[0].delta.content:
                    first = first or time.perf_counter()
                    text.append(chunk.choices[0].delta.content)
        except openai.APIError:
            out.append(("error", None))
            continue
        msgs.append({"role": "assistant", "content": "".join(text)})
        out.append((slot, (first - t0) * 1000 if first is not None else None))
    return out


def _drive(base_url: str, sessions: int, turns: int, seed: int) -> dict[str, Any]:
    """All sessions at once (one thread each, turns in order within a session), as agents of a workflow run."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    sids = [f"wf{i}/worker-{i % 3}" for i in range(sessions)]
    with ThreadPoolExecutor(max_workers=sessions) as pool:
        results = list(pool.map(lambda sid: _session(client, sid, f"You are agent {sid}.", turns, seed), sids))
    hits = follow_ups = errors = 0
    served: Counter[str] = Counter()
    ttft_ms: list[float] = []
    for rows in results:
        prev: str | None = None
        for i, (slot, ttft) in enumerate(rows):
            if slot == "error":
                errors += 1
                continue
            served[slot] += 1
            if i > 0:
                follow_ups += 1
                hits += slot == prev
                if ttft is not None:
                    ttft_ms.append(ttft)
            prev = slot
    loads = list(served.values()) + [0] * max(0, 2 - len(served))
    mean = sum(loads) / len(loads) if loads else 0
    return {"affinity": hits / follow_ups if follow_ups else None,
            "max_over_mean_load": max(loads) / mean if mean else None,
            "requests_per_replica": dict(served),
            "follow_up_ttft_ms_p50": percentile(ttft_ms, 0.5), "follow_up_ttft_ms_p95": percentile(ttft_ms, 0.95),
            "errors": errors}


def real_run(sessions: int = 8, turns: int = 4, seed: int = 0) -> dict[str, Any]:
    import ray
    from ray import serve

    from kvsched.adapters.ray.app import BASELINE_ROUTERS, ROUTER_PATH, build_app
    from kvsched.adapters.ray.config import parse_config
    from kvsched.serving import free_port

    port = free_port()
    cfg = parse_config({
        "http": {"host": "127.0.0.1", "port": port}, "router": {"stats_period_s": 1},
        "pools": [{"name": "tiny", "model": "kvsched-tiny:test", "models": ["tiny"], "replicas": 2, "num_cpus": 0,
                   "max_model_len": 1024, "block_size": 32, "kv_cache_gib": 1, "max_ongoing_requests": 16}]})
    cfg = dataclasses.replace(cfg, request_retries=1)
    out: dict[str, Any] = {"config": {"replicas": 2, "sessions": sessions, "turns": turns, "model": "kvsched-tiny:test",
                                      "max_model_len": 1024, "seed": seed}, "policies": {}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name in ROUTERS:
            path = ROUTER_PATH if name.startswith("kvsched") else BASELINE_ROUTERS[name]
            run_cfg = cfg if name != "kvsched_floor8" else dataclasses.replace(
                cfg, router=dataclasses.replace(cfg.router, load_floor=8))
            t0 = time.perf_counter()
            serve.run(build_app(run_cfg, router_path=path), name="bench", route_prefix="/")
            ready_s = time.perf_counter() - t0
            row = _drive(f"http://127.0.0.1:{port}/v1", sessions, turns, seed)
            out["policies"][name] = row | {"startup_s": ready_s}
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    return out
