"""What the ingress tells the engines' request router about one request, beyond its session id.

Passed as the `route` keyword of the engine replica's methods: Ray hands the router the call's arguments
(`PendingRequest.kwargs`), which is how Ray's own routers read a request (its prompt, for prefix affinity); the
replica ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RouteHints:
    """`exclude`: replicas (Ray replica unique ids, or actor ids) that failed this request before any byte of the
    answer was sent, so a retry must go elsewhere; `gone`: those of them whose engine is gone (its process exited, or
    the replica actor died), which no request may use until Ray replaces them; `end_session`: the session ends with
    this request (`X-Session-End`, `DELETE /kvsched/sessions/{id}`), the router forgets it once it is done."""

    exclude: tuple[str, ...] = ()
    gone: tuple[str, ...] = ()
    end_session: bool = False
