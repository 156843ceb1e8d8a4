"""Hash chains that identify a conversation's exact message prefixes.

Two chains over one request's messages: `full` covers every message (the engine's lineage names what a turn sent by
it), `body` the messages after the leading system ones. Checkpoints are matched by `body`, and a rewrite serves the
request's *current* system messages: found by review (/tmp/rev_compaction/p7_volatile_system.py), a system prompt that
changes every turn ("Current time: ...") made every summary unusable by the next request, so each turn paid for a new
summary call and none was ever served.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvsched.core.compaction_layout import Message, leading_system_messages

FULL_SEED = b"kvsched-compaction-v1"
BODY_SEED = b"kvsched-compaction-body-v2"  # a new seed: a checkpoint of the old full-chain kind never matches a body


def message_digest(message: Message) -> bytes:
    """SHA-256 of a message's canonical JSON: any change in role, content, name or tool calls changes it."""
    text = json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()  # a lone surrogate ("\ud800") too


def _chain(seed: bytes, digests: Iterable[bytes]) -> list[str]:
    h = hashlib.sha256(seed).digest()
    out = [h.hex()]
    for d in digests:
        h = hashlib.sha256(h + d).digest()
        out.append(h.hex())
    return out


def prefix_digests(messages: Sequence[Message]) -> list[str]:
    """`out[k]` identifies exactly `messages[:k]` (a hash chain, so equal digests mean equal prefixes)."""
    return _chain(FULL_SEED, map(message_digest, messages))


@dataclass(frozen=True, slots=True)
class Digests:
    """Both chains of one request: `full[k]` identifies `messages[:k]`, `body[k]` the first k messages after the
    `system` leading system messages."""

    full: list[str]
    body: list[str]
    system: int

    @property
    def root(self) -> str:
        """The conversation among those under one session id: its first message after the system ones."""
        return self.body[min(1, len(self.body) - 1)]


def digests_of(messages: Sequence[Message]) -> Digests:
    each = [message_digest(m) for m in messages]
    system = leading_system_messages(messages)
    return Digests(_chain(FULL_SEED, each), _chain(BODY_SEED, each[system:]), system)


def conversation_prefixes(messages: Sequence[Message]) -> frozenset[str]:
    """Every body-chain digest of `messages`: the checkpoints a request of exactly these messages could match."""
    return frozenset(digests_of(messages).body)


def conversation_root(messages: Sequence[Message]) -> str:
    """`Digests.root` of `messages` (its first message after the system ones; system messages do not count)."""
    system = leading_system_messages(messages)
    return _chain(BODY_SEED, map(message_digest, messages[system: system + 1]))[-1]
