"""The compaction store's records: checkpoints, summary jobs, plans and per-session state, and the bounds on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kvsched.core.compaction_config import Strategy
from kvsched.core.compaction_layout import Message

CONVERSATIONS_PER_SESSION = 16  # conversations under one id with their own summaries, jobs and failure clocks


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The client's messages `[system_count, replaced)` after its `system_count` leading system messages (exactly
    those whose body chain, `compaction_digests.Digests.body`, hashes to `digest`) stand for `summary`; `summary is
    None` means they were dropped (sliding window). A request matches whatever its own system messages are."""

    digest: str
    replaced: int
    system_count: int
    summary: str | None
    summary_tokens: int = 0
    root: str = ""  # the conversation under the session id (`conversation_root`) it belongs to; "" if unknown


@dataclass(frozen=True, slots=True)
class SummaryJob:
    """One summarization call to make: `prompt` is the conversation as served up to the cut, plus the instruction
    (so its prefix is the session's own cached prefix); the result replaces the client's messages `[0, cut)`."""

    session: str
    digest: str
    cut: int
    system_count: int
    prompt: tuple[Message, ...]
    older_tokens: int
    root: str = ""  # the conversation under the session id (`conversation_root`): pending and failures are its own


@dataclass(frozen=True, slots=True)
class Plan:
    """How to serve one request: `messages` (the rewrite, or the request's own), how many of the client's messages
    were replaced, the estimated prompt tokens before and after, an optional job and an optional refusal."""

    strategy: Strategy
    messages: tuple[Message, ...]
    replaced: int
    tokens: int
    original_tokens: int
    job: SummaryJob | None = None
    refusal: str | None = None
    kept_system: int = 0  # leading system messages served as sent (counted in `replaced`, replaced by nothing)
    digests: tuple[str, ...] = ()  # `prefix_digests` of the client's messages (summarize and sliding window only)
    root: str = ""  # the conversation under the session id (`conversation_root`; summarize and sliding window only)
    probe: bool = False  # served as sent to learn whether a refused rewrite was the cause (`CompactionStore.suspect`)


@dataclass(slots=True)
class SessionState:
    checkpoints: list[Checkpoint] = field(default_factory=list)  # newest last
    # Per conversation under the id (`conversation_root`; a `user:` id holds all of a user's chats): the job handed out
    # and not yet reported (its digest), and when its last call failed. Found by review: one chat's failed summary
    # held every other chat under the id back for `retry_after_s`.
    pending: dict[str, str] = field(default_factory=dict)
    failed_at: dict[str, float] = field(default_factory=dict)
    refused: dict[str, float] = field(default_factory=dict)  # conversations served as sent for good (`refuse`)
    suspect: dict[str, float] = field(default_factory=dict)  # a rewrite refused, the next turn not yet answered
    # the newest summary of a conversation until a request uses it: (its digest, committed at, how many in a row)
    unused: dict[str, tuple[str, float, int]] = field(default_factory=dict)
    adopted: set[str] = field(default_factory=set)  # digests of checkpoints taken from the shared store, not made here
    last_tokens: int = 0
    peak_served_tokens: int = 0


def bounded_checkpoints(checkpoints: Sequence[Checkpoint], cp: Checkpoint, per_conversation: int) -> list[Checkpoint]:
    """`checkpoints` with `cp` added (newest last; one of the same digest replaced): `per_conversation` per
    conversation under the id and that many for each of up to `CONVERSATIONS_PER_SESSION` conversations in all, the
    oldest going first. Found by review: one bound for the whole id let a `user:` id's fifth concurrent chat evict the
    others' summaries (each then summarised again)."""
    kept = [c for c in checkpoints if c.digest != cp.digest] + [cp]
    same = [c for c in kept if c.root == cp.root]
    for old in same[:-per_conversation]:
        kept.remove(old)
    del kept[: -per_conversation * CONVERSATIONS_PER_SESSION]
    return kept


def bounded_put(table: dict[str, Any], key: str, value: Any, limit: int = CONVERSATIONS_PER_SESSION) -> None:
    """Set `key` (newest last) in a per-session table of conversations, the oldest going past `limit`."""
    table.pop(key, None)
    table[key] = value
    while len(table) > limit:
        del table[next(iter(table))]
