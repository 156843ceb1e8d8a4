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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


# An opening with this many requests in flight is shared by several conversations (one conversation sends its turns
# one after another; a chat client's title request makes two): the next request of it goes least-loaded.
HOT_OPENING = 2


class OpeningRoutes:
    """The ingress's routing keys for unnamed chat conversations. Found by review: all conversations with one
    opening (a fixed greeting, a template) are one key, so with the key alone a burst of them piled onto one replica
    up to the load floor (32 of 40 on one of four replicas) and moved back and forth when it overflowed. A key with
    HOT_OPENING requests in flight is not used for the next one; nor is it a session anywhere else (its size does not
    pick the long-context pool: another conversation's growth would send every new one with that opening there)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.in_flight: dict[str, int] = {}

    def key(self, payload: dict[str, Any], scope: Callable[[str], str]) -> str | None:
        """The routing key of this request's opening (`scope`: the caller's key and salt added), or None: least
        loaded (turned off, no opening, or a hot one)."""
        opening = opening_id(payload) if self.enabled else None
        key = scope(opening) if opening is not None else None
        return key if key is not None and self.in_flight.get(key, 0) < HOT_OPENING else None

    @contextmanager
    def sent(self, key: str | None) -> Iterator[None]:
        """Counts the request in flight under `key` (None: nothing) until it answered (a stream: its first bytes)."""
        if key is None:
            yield
            return
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            yield
        finally:
            left = self.in_flight.pop(key) - 1
            if left:
                self.in_flight[key] = left
