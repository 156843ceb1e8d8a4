"""tools/soak_ray.py for a few seconds on the package's cluster: two replicas of the tiny model (small pools, the FP8
tier, two tenants' keys) behind kvsched's ingress and router, a stock `vllm serve` beside them; agent sessions through
the ingress compared with stock, each turn's replica recorded, the engines' load sampled, then the end: every replica
clean and still decoding as stock does. (The losses are the long soak's and tests/ray/test_serve_integration.py's:
a replacement's start-up alone is longer than this test.) The app and stock start early (shared_cluster.py), once
test_serve_integration's engines are gone."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ray.shared_cluster import Early, delete_app, early, start_app, start_cluster, wait_running

pytestmark = pytest.mark.integration
TOOLS = str(Path(__file__).resolve().parents[2] / "tools")
APP = "soakray"  # its app and route prefix: deployed early beside the other modules' apps at "/"


def _tools() -> None:
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)


def deploy() -> dict[str, Any]:
    """The app and the stock server, neither waited for (the fixture waits: here, in the main thread, the stock
    server's start-up held the session's next module's set-up, test_hostile_ingress', 77 s in a full run)."""
    import argparse

    from kvsched.adapters.ray.app import build_app
    from kvsched.adapters.ray.config import parse_config
    from kvsched.serving import ServerSpec, VllmServer
    from kvsched.tiny_model import ensure_tiny_model

    _tools()
    import soak_ray

    args = argparse.Namespace(tier_gb=0.003, tenants=2, load_factor=1.25, load_floor=6, deadline_s=60.0, blocks=40,
                              no_store=True)
    raw = soak_ray.ray_config(start_cluster()["port"], "tiny-soakray-test", args)
    raw.update(app_name=APP, route_prefix=f"/{APP}")
    start_app(build_app(parse_config(raw)), APP, route_prefix=f"/{APP}")
    stock = VllmServer(ServerSpec(model=ensure_tiny_model("test"), scheduler=None, worker="in_engine",
                                  max_model_len=1024, extra_args=soak_ray.DETAILS))
    stock.launch()
    return {"stock": stock}


def stop(started: dict[str, Any]) -> None:
    started["stock"].stop()
    delete_app(APP)


EARLY = {"app": Early(deploy, stop, main_thread=True, once_over="tests.ray.test_serve_integration")}


@pytest.fixture(scope="module")
def servers(serve_cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    started: dict[str, Any] = {}
    try:
        started = early(sys.modules[__name__], "app")
        started["stock"].wait_ready()
        wait_running(APP)
        yield {**started, "base": f"{serve_cluster['base']}/{APP}", "logs": serve_cluster["logs"]}
    finally:
        if started:
            stop(started)


def test_a_short_soak_through_the_ingress_decodes_as_stock_and_ends_clean(servers: dict[str, Any]) -> None:
    _tools()
    from soak import ADMIN, tenant_keys
    from soak_clients import Target
    from soak_ray import MODEL, soak_ray
    from soak_ray_watch import Monitor, Placements

    placements = Placements()
    keys = tenant_keys(2)
    ingress = Target("ray", servers["base"], MODEL, keys[0], ADMIN, tenants=keys, observe=placements.observe)
    report = soak_ray(ingress, Target("stock", servers["stock"].base, "tiny"), Monitor(servers["base"], ADMIN, 1.25, 6),
                      placements, 8.0, 3, seed=3, logs=servers["logs"], bad=False)
    assert not report["failures"], report["failures"]
    v = report["verdict"]
    assert v["mismatch_count"] == 0 and v["compared"] >= 3, v
    assert sum(report["router"]["per_replica_turns"].values()) >= v["compared"]
    assert report["router"]["moves"]["counts"].get("stayed", 0) >= 1, report["router"]
    assert report["router"]["load"]["samples"] >= 1
    for slot in ("slot-0", "slot-1"):
        end = report["end"][slot]["after_probe"]
        assert end["pinned_blocks"] == 0 and end["free_blocks"] == end["total_blocks"], report["end"]
