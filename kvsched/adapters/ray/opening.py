"""A routing key for chat requests that name no session: the conversation's opening.

Without a session id the router used to send a request to the least-loaded replica, so an unnamed conversation's
turns spread over the replicas and each turn landed where its earlier KV was not (found by review): the engine's
session inference (kvsched.core.lineage) then had nothing to continue. Every turn of a chat conversation repeats its
opening, the messages up to and including the first user message, so a digest of those keys all of its turns alike
and the router keeps them on one replica (bounded load still spreads a hot opening). Two conversations with the
same opening share a key: they share that prefix's KV too, which is where it is cached.

Completions prompts carry no message boundaries (where the first turn ends is unknown), so they stay least-loaded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Not a character a session id may hold (kvsched.core.sessions refuses control characters): no client's session id
# can name an opening's key.
OPENING_MARK = "\x1eopening:"


def opening_id(payload: dict[str, Any]) -> str | None:
    """The routing id of a chat request's opening, or None (no messages, no user message, not a chat request)."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return None
    digest = hashlib.blake2b(digest_size=16)
    for m in messages:
        if not isinstance(m, dict):
            return None
        role = m.get("role")
        digest.update(json.dumps([role, m.get("content")], sort_keys=True, separators=(",", ":")).encode())
        if role == "user":
            return OPENING_MARK + digest.hexdigest()
    return None
