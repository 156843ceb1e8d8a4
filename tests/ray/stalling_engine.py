"""For the hanging-/metrics test on a real Ray cluster (imported by Ray's workers by name): kvsched's own engine
replica, its real `vllm serve` behind a `StallingProxy` (requests and scrapes alike), which stalls `GET /metrics`
while the file `block_file` exists and writes its counts to `report_file`. `poll_settings`: `EngineReplica`'s
keyword arguments (the router's `poll_deadline_s`, `routing_wait_s`), as `build_app` passes them."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import httpx

from kvsched.adapters.ray.engine import EngineReplica
from tests.ray.stalling_proxy import StallingProxy


class ProxiedEngineReplica(EngineReplica):
    def __init__(self, pool: str, engine: dict[str, Any], unscraped_grace_s: float, ttft_hold_s: float,
                 block_file: str, report_file: str, **poll_settings: float) -> None:
        super().__init__(pool, engine, unscraped_grace_s, ttft_hold_s, **poll_settings)
        self.proxy = StallingProxy(int(urlsplit(self.server.base).port or 0), block_file, report_file)
        self.stats.base_url = self.proxy.base
        self.client = httpx.AsyncClient(base_url=self.proxy.base, timeout=httpx.Timeout(None, connect=10.0))
