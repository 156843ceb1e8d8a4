"""vLLM's API server internals kvsched's middleware reads (server args, API keys, engine-core utility calls)."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from kvsched.adapters.vllm.compat.requests import PACKED_ARGS, SCHEDULER_UTILITY


# ---- API server -------------------------------------------------------------------------------------------------
@functools.cache
def auth_guarded_prefixes() -> tuple[str, ...]:
    """Paths vLLM's AuthenticationMiddleware checks the key on (others it serves to anyone, e.g. /invocations). Read on
    first use, in the API server: found by review, reading it at import pulled FastAPI, Starlette and pydantic's
    extras into every engine-core and worker process, through the plugin's register()."""
    try:
        from vllm.entrypoints.serve.middleware.authenticate import GUARDED_PREFIX
    except ImportError:  # vLLM 0.32's value
        return ("/v1", "/v2", "/inference", "/cohere")
    return (GUARDED_PREFIX,) if isinstance(GUARDED_PREFIX, str) else tuple(GUARDED_PREFIX)


def serves_route(app: Any, scope: dict[str, Any]) -> bool:
    """Whether vLLM's app has a route for this request's path and method (Starlette's own matching, as its router will
    run it: a mount or a `{param}` path counts). vLLM answers anything else 404/405 without reading the body. True when
    the app's routes cannot be read (an app without `routes`, a route that cannot match this scope): the body is then
    checked as if served."""
    routes = getattr(app, "routes", None)
    if routes is None:
        return True
    try:
        from starlette.routing import Match

        return any(route.matches(scope)[0] == Match.FULL for route in routes)
    except Exception:
        return True


def server_args(app: Any) -> Any:
    return getattr(app.state, "args", None)


async def call_scheduler(app: Any, op: str, *args: Any, timeout_s: float | None = None) -> Any:
    """Run `scheduler(op, [args...])` on the engine-core thread and return its (msgpack-able) result. The arguments
    travel as one list: vLLM's utility dispatch refuses more arguments than the callee's signature names. With
    `timeout_s`, TimeoutError when the engine core does not answer in time (vLLM drops a late answer to a cancelled
    call)."""
    engine_client = app.state.engine_client
    packed = ({PACKED_ARGS: list(args)},) if args else ()
    call = engine_client.engine_core.call_utility_async(SCHEDULER_UTILITY, op, *packed)
    return await (call if timeout_s is None else asyncio.wait_for(call, timeout_s))


def api_keys(app: Any) -> list[str]:
    import vllm.envs as envs

    args = server_args(app)
    keys = list(getattr(args, "api_key", None) or [envs.VLLM_API_KEY])
    return [k for k in keys if k]


def served_context_tokens(app: Any) -> int:
    """The served model's context length (`AsyncLLM.model_config.max_model_len`, vLLM 0.32); 0 if unknown."""
    try:
        return int(app.state.engine_client.model_config.max_model_len)
    except (AttributeError, TypeError, ValueError):
        return 0
