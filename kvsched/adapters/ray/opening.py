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
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# Not a character a session id may hold (kvsched.core.sessions refuses control characters): no client's session id
# can name an opening's key.
OPENING_MARK = "\x1eopening:"


def opening_id(payload: dict[str, Any]) -> str | None:
    """The routing id of a chat request's opening, or None (no messages, no user message, not a chat request)."""
    found = digests(payload)
    return found[0] if found is not None else None


def digests(payload: dict[str, Any]) -> tuple[str, str] | None:
    """(the opening's id, the conversation's: a digest of the messages before the last user message), in one pass;
    None without an opening. Requests of one conversation sent at once (an agent's fan-out over its history) share
    the second; different conversations under one opening differ in it from their second turn on."""
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return None
    digest, opening, before_last_user = hashlib.blake2b(digest_size=16), None, ""
    for m in messages:
        if not isinstance(m, dict):
            return None
        role = m.get("role")
        if role == "user":
            before_last_user = digest.hexdigest()
        digest.update(json.dumps([role, m.get("content")], sort_keys=True, separators=(",", ":")).encode())
        if role == "user" and opening is None:
            opening = OPENING_MARK + digest.hexdigest()
    return (opening, before_last_user) if opening is not None else None


# An opening with requests of this many other conversations in flight is shared by several (different histories
# before their last user message): the next request of it goes least-loaded.
HOT_OPENING = 2


@dataclass(frozen=True, slots=True)
class Opening:
    key: str  # the router's key: the opening's id with the caller's key and salt
    conversation: str


class OpeningRoutes:
    """The ingress's routing keys for unnamed chat conversations. Found by review: all conversations with one
    opening (a fixed greeting, a template) are one key, so with the key alone a burst of them piled onto one replica
    up to the load floor (32 of 40 on one of four replicas) and moved back and forth when it overflowed. A key with
    requests of HOT_OPENING other conversations in flight is not used for the next one (counted by conversation, not
    request: an agent's parallel calls over one history stay together, found by review); nor is it a session
    anywhere else (its size does not pick the long-context pool: another conversation's growth would send every new
    one with that opening there).

    The count is this ingress replica's. kvsched deploys one (`app.build_app`), so it is the deployment's. Ingress
    replicas added outside kvsched (a Ray Serve config overriding the ingress's `num_replicas`; old and new side by
    side during a redeploy) each count their own: up to HOT_OPENING conversations of one opening are then keyed at
    once per ingress replica, k x HOT_OPENING with k of them, as the router's load counts are per ingress too
    (router.py). Not shared through the store: it is optional and the engines' (the ingress holds no client), a
    round trip per request, and counts a crashed ingress left behind would linger until a TTL."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.in_flight: dict[str, Counter[str]] = {}

    def key(self, payload: dict[str, Any], scope: Callable[[str], str]) -> Opening | None:
        """This request's opening (`scope`: the caller's key and salt added to its id), or None: least loaded
        (turned off, no opening, or a hot one)."""
        found = digests(payload) if self.enabled else None
        if found is None:
            return None
        opening = Opening(scope(found[0]), found[1])
        others = self.in_flight.get(opening.key, Counter()).keys() - {opening.conversation}
        return opening if len(others) < HOT_OPENING else None

    @contextmanager
    def sent(self, opening: Opening | None) -> Iterator[None]:
        """Counts the request in flight under its opening (None: nothing) until it answered (a stream: its first
        bytes)."""
        if opening is None:
            yield
            return
        count = self.in_flight.setdefault(opening.key, Counter())
        count[opening.conversation] += 1
        try:
            yield
        finally:
            count[opening.conversation] -= 1
            if not count[opening.conversation]:
                del count[opening.conversation]
            if not count and self.in_flight.get(opening.key) is count:
                del self.in_flight[opening.key]
