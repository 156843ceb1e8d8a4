"""What kvsched's middlewares in Ray Serve's HTTP proxy (kvsched/adapters/ray/proxy_headers.py, proxy_body.py) add
to a normal request: one awaited call on a request scope of 9 typical headers, against the bare ASGI app and against
Ray's own RequestIdMiddleware (which the proxy runs on every request), best of 7 rounds of 200,000 calls in one
coroutine.

    python tools/proxy_headers_call.py

A microbenchmark, not a benchmark of the proxy: it shows the call's cost beside what Ray's proxy already spends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.serve._private.http_util import RequestIdMiddleware

from kvsched.adapters.ray.proxy_body import ProxyBodyLimit
from kvsched.adapters.ray.proxy_headers import RayHeadersUtf8
from kvsched.adapters.ray.requests import MAX_BODY_BYTES

HEADERS = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"OpenAI/Python 1.99.0"), (b"accept", b"application/json"),
           (b"content-type", b"application/json"), (b"content-length", b"312"),
           (b"authorization", b"Bearer sk-0123456789abcdef"), (b"x-session-id", b"agent-7/worker-3"),
           (b"x-stainless-lang", b"python"), (b"x-request-id", b"6f1d7d1c-7b7e-4d3e-9c8a-2b1f0e9d8c7b")]
App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    return None


async def per_call_ns(f: App, headers: list[tuple[bytes, bytes]], n: int = 200_000, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            await f({"type": "http", "headers": list(headers)}, None, None)
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e9


async def main() -> None:
    base = await per_call_ns(app, HEADERS)
    ours = await per_call_ns(RayHeadersUtf8(app), HEADERS)
    rays = await per_call_ns(RequestIdMiddleware(app), HEADERS)
    utf8 = [*HEADERS[:-1], (b"x-request-id", "日本-7b7e".encode())]
    ours_utf8 = await per_call_ns(RayHeadersUtf8(app), utf8)
    limit = await per_call_ns(ProxyBodyLimit(app, MAX_BODY_BYTES), HEADERS)
    print(f"{len(HEADERS)} headers: bare app {base:.0f} ns a call; kvsched's middleware +{ours - base:.0f} ns "
          f"(+{ours_utf8 - base:.0f} ns with a UTF-8 X-Request-Id outside ASCII); Ray's RequestIdMiddleware "
          f"+{rays - base:.0f} ns; kvsched's body limit (proxy_body.py, a declared length) +{limit - base:.0f} ns")


if __name__ == "__main__":
    asyncio.run(main())
