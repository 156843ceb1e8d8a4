"""The app the Ray body tests send requests to (tests/ray/test_ingress_bodies.py, test_proxy_bodies.py): kvsched's
ingress as `build_app` deploys it, over one stand-in engine replica, with the body limit and timeout a test sets; and
the good turn each test sends after its probe."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from tests.raw_http import answered, exchange

PATH = "/v1/chat/completions"
GOOD = json.dumps({"model": "w", "messages": [{"role": "user", "content": "hi"}]}).encode()


@contextlib.contextmanager
def bodies_app(serve_cluster: dict[str, Any], name: str, max_body_bytes: int, body_timeout_s: float) -> Iterator[int]:
    """Deploys the app as `name` on the shared cluster while the block runs; yields the HTTP port."""
    from ray import serve

    from kvsched.adapters.ray.app import engine_options
    from kvsched.adapters.ray.config import parse_config
    from kvsched.adapters.ray.ingress import OpenAIIngress
    from tests.ray.shared_cluster import QUICK_DRAIN, deployed
    from tests.ray.standin_engine import StandInEngine

    cfg = parse_config({"http": {"host": "127.0.0.1", "port": serve_cluster["port"]}, "router": {"stats_period_s": 1},
                        "request_deadline_s": 30, "max_body_bytes": max_body_bytes, "body_timeout_s": body_timeout_s,
                        "pools": [{"name": "w", "model": "/m", "models": ["w"], "replicas": 1, "num_cpus": 0}]})
    engines = {p.name: serve.deployment(StandInEngine).options(**{**engine_options(p, cfg), **QUICK_DRAIN}).bind(
        p.name, p.engine.model_dump()) for p in cfg.pools}
    ingress = serve.deployment(OpenAIIngress).options(name="ingress", num_replicas=1, max_ongoing_requests=4,
                                                      ray_actor_options={"num_cpus": 0}, **QUICK_DRAIN)
    with deployed(ingress.bind(cfg.to_dict(), engines), name=name):
        yield serve_cluster["port"]


def serves(port: int) -> None:
    """A good turn after the probe: 200."""
    answer, failure = exchange(port, PATH, [b"connection: close", b"content-length: %d" % len(GOOD)], [GOOD])
    assert failure is None and answered(answer)[0] == 200, (failure, answer[:300])
