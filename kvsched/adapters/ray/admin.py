"""The ingress's admin routes over every replica of every pool: one call broadcast to each pool's replicas.

A pool with no replica running (autoscaled to zero: `autoscaling.min_replicas: 0`) has nothing to answer: Ray 2.60's
`DeploymentHandle.broadcast` raises `ray.serve.exceptions.DeploymentUnavailableError` for it (raised in
`serve/_private/router.py`, `AsyncioRouter.broadcast`, when the router's replica set is empty; its message says
"failed to deploy" whatever the cause), and `results_async(return_exceptions=True)` passes it on instead of
collecting it, being raised before there is any replica result to collect. Found by review: it failed
`DELETE /kvsched/sessions/{id}`, `GET /kvsched/sessions` and `GET /kvsched/replicas` with 503 for every pool, and the
routers never forgot the deleted session. Such a pool is taken as having no replicas. Ray raises the same error when
the deployment failed to deploy, or when every replica it sent the call to had died before it was sent (nothing of a
dead replica's KV is left either).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from ray.serve.exceptions import DeploymentUnavailableError

logger = logging.getLogger("ray.serve")
Answers = list[tuple[str, dict[str, Any]]]
Failures = list[tuple[str, BaseException]]


async def broadcast_all(engines: Mapping[str, Any], method: str, *args: Any,
                        per_pool: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Answers, Failures]:
    """`method(*args)` on every replica of every pool (`per_pool`: keyword arguments for one pool's replicas): (pool,
    answer) of each replica that answered, and (pool, error) of each that failed, logged. A pool without replicas
    adds neither."""

    async def one(name: str, handle: Any) -> tuple[str, list[Any]]:
        kwargs = dict((per_pool or {}).get(name, {}))
        try:
            return name, await handle.broadcast(method, *args, **kwargs).results_async(return_exceptions=True)
        except DeploymentUnavailableError:
            logger.info(f"kvsched ingress: pool {name} has no replica running; {method} skipped there")
            return name, []

    answers: Answers = []
    failed: Failures = []
    for name, results in await asyncio.gather(*(one(n, h) for n, h in engines.items())):
        for r in results:
            if isinstance(r, dict):
                answers.append((name, r))
            else:
                failed.append((name, r if isinstance(r, BaseException) else RuntimeError(repr(r))))
                logger.warning(f"kvsched ingress: a replica of pool {name} failed {method}{args[:2]}: {r!r}")
    return answers, failed
