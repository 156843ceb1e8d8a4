"""What the ingress and the engines' request router tell each other about one request: the hints the ingress passes
with it, and the error an engine replica raises when it cannot answer it.

Passed as the `route` keyword of the engine replica's methods: Ray hands the router the call's arguments
(`PendingRequest.kwargs`), which is how Ray's own routers read a request (its prompt, for prefix affinity); the
replica ignores it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RouteHints:
    """`exclude`: replicas (Ray replica unique ids, or actor ids) that failed this request before any byte of the
    answer was sent, so a retry must go elsewhere; `gone`: those of them whose engine is gone (its process exited, or
    the replica actor died), which no request may use until Ray replaces them; `end_session`: the session ends with
    this request (`X-Session-End`, `DELETE /kvsched/sessions/{id}`), the router forgets it once it is done; `slot`:
    filled in by the router, the index of its slot for the replica it chose, which the replica names in its answer
    (`X-KVSched-Replica`): the router keeps a replica in its slot when Ray renumbers its rank (`slots.py`)."""

    exclude: tuple[str, ...] = ()
    gone: tuple[str, ...] = ()
    end_session: bool = False
    slot: int | None = None


class EngineUnavailable(RuntimeError):
    """This replica's vLLM server could not take or answer the request; nothing of the answer was sent. `gone`: the
    server process has exited (the replica is useless until Ray replaces it)."""

    def __init__(self, slot: int, replica_id: str, gone: bool, detail: str) -> None:
        super().__init__(f"engine replica slot-{slot} ({replica_id}) {'is gone' if gone else 'failed'}: {detail}")
        self.slot, self.replica_id, self.gone, self.detail = slot, replica_id, gone, detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (EngineUnavailable, (self.slot, self.replica_id, self.gone, self.detail))


# The router's session key: the session id, and after SCOPE_SEP (a control character, which no session id holds) a
# digest of who owns it on the engine: its tenant (the API key, on pools that check keys) and its cache salt. Two
# tenants' sessions of one id are two sessions to the engine, so they are two to the router: one ending (or growing
# into the long-context pool) does not touch the other's routing.
SCOPE_SEP = "\x1f"


def routing_session(session_id: str, api_key: str | None = None, cache_salt: str | None = None) -> str:
    if api_key is None and cache_salt is None:
        return session_id
    owner = json.dumps(["kvsched-route", api_key, cache_salt]).encode()  # ASCII: json escapes the rest
    return f"{session_id}{SCOPE_SEP}{hashlib.sha256(owner).hexdigest()[:24]}"


def plain_session(key: str) -> str:
    """The session id of a routing key (what engines report their KV under)."""
    return key.split(SCOPE_SEP, 1)[0]
