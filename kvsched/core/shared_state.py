"""What kvsched keeps in the shared store (when one is configured), and the one small interface every store backend
implements.

Three kinds of entries, each with a TTL so an abandoned session's state goes by itself:
- block payloads: one KV block (FP8 bytes + scales + CRC, framed by the adapter), keyed by the model's identity and
  vLLM's content hash of the block (which covers every earlier token and the `cache_salt`), so nothing is served
  across models or tenants;
- session metadata (`SessionMeta`): role, TTL, turns and the replica that served the last turn, so a replica that
  receives a moved session knows it moved and what it is;
- compaction checkpoints: the summaries that stand for a session's older messages, each with the digest of the exact
  message prefix it replaces (`kvsched.core.compaction.Checkpoint`), so a moved session is served compacted at once.

Pure: names, encodings and the interface; the Redis client lives in kvsched/adapters/store.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from kvsched.core.compaction import Checkpoint
from kvsched.core.compaction_checkpoints import bounded_checkpoints

PREFIX = "kvsched"
DEFAULT_KV_TTL_S = 3600.0
DEFAULT_STATE_TTL_S = 86400.0
MAX_TTL_S = 10 * 365 * 86400.0  # a store entry's time to live: finite, and within what Redis accepts in milliseconds
# What decoding a store value may raise: bad JSON or text (UnicodeDecodeError is a ValueError), a wrong type, an
# infinite or NaN number where an int belongs (OverflowError), nesting past the parser's limit (RecursionError)
MALFORMED: tuple[type[Exception], ...] = (ValueError, TypeError, AttributeError, OverflowError, RecursionError)
MALFORMED_ROW: tuple[type[Exception], ...] = (KeyError, *MALFORMED)  # a row that lacks a field, too


class SharedStore(Protocol):
    """put/get/delete of block payloads and of session state, with TTLs. Calls never raise for an unreachable store:
    a put returns False, a get returns None (a miss), and the caller recomputes."""

    def put_blocks(self, items: Mapping[str, bytes], ttl_s: float) -> bool: ...

    def get_blocks(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def has_blocks(self, keys: Sequence[str]) -> list[bool]: ...

    def delete_blocks(self, keys: Sequence[str]) -> bool: ...

    def put_state(self, key: str, value: str, ttl_s: float) -> bool: ...

    def update_state(self, key: str, update: Callable[[str | None], str | None], ttl_s: float) -> bool:
        """Read-modify-write of one state value, atomic against other clients' writes (`update` may run more than
        once; it returns the new value, None to delete)."""
        ...

    def get_state(self, key: str) -> str | None: ...

    def get_states(self, keys: Sequence[str]) -> list[str | None]: ...

    def delete_state(self, key: str) -> bool: ...


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":"), default=str).encode()).hexdigest()[:32]


def block_key(identity: str, content_key: bytes, rank: int = 0) -> str:
    """A block payload's store key: the model/geometry identity, vLLM's content hash, the tensor-parallel rank."""
    return f"{PREFIX}:kv:{identity}:{content_key.hex()}:r{rank}"


def session_key(identity: str, session_id: str, cache_salt: str | None, tenant: str | None = None,
                inferred: str | None = None) -> str:
    """Session metadata's store key (hashed: session ids may hold any printable character). Sessions belong to their
    API key's tenant and `cache_salt`: another tenant's session of the same id is another key. An inferred session
    (`SessionKey.inferred`) is another key too: `inferred` names the replica whose counter named it (its id,
    `inferred-N`, means nothing elsewhere), so neither another replica's `inferred-N` nor a client's session named
    `inferred-N` shares its key (found by review). A session's branches share its key: their numbers are each
    engine's own, so a branch's key could never be found by the replica the session moves to."""
    parts: tuple[object, ...] = (session_id, cache_salt) if tenant is None else (session_id, cache_salt, tenant)
    if inferred is not None:  # else the key the earlier versions wrote (a client-named session)
        parts = (*parts, {"inferred": inferred})
    return f"{PREFIX}:session:{identity}:{_digest(*parts)}"


def compaction_key(session: str) -> str:
    """Compaction checkpoints' store key; `session` is the compactor's own session key (model, salt, id)."""
    return f"{PREFIX}:compaction:{_digest(session)}"


@dataclass(frozen=True, slots=True)
class SessionMeta:
    """A session as the last replica that served it left it."""

    role: str | None = None
    ttl_s: float | None = None
    turns: int = 0
    replica: str = ""
    blocks: int = 0  # full KV blocks the session's last turn published to the shared level

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes | None) -> SessionMeta | None:
        """The metadata in `raw`, or None when it is missing or malformed (another version or program wrote it:
        ignored). Total: whatever the store holds (bytes that are not UTF-8, `1e999`, nesting deeper than the parser's
        recursion limit, a list) is None, never an exception (found by review: those crashed the engine core)."""
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            role = d.get("role")
            ttl = d.get("ttl_s")
            meta = cls(role=str(role) if role is not None else None,
                       ttl_s=float(ttl) if ttl is not None else None, turns=int(d.get("turns", 0)),
                       replica=str(d.get("replica", "")), blocks=int(d.get("blocks", 0)))
        except MALFORMED:
            return None
        if meta.ttl_s is not None and not (math.isfinite(meta.ttl_s) and meta.ttl_s >= 0):
            return None
        return meta if meta.turns >= 0 and meta.blocks >= 0 else None


def encode_checkpoints(checkpoints: Sequence[Checkpoint]) -> str:
    return json.dumps([asdict(c) for c in checkpoints], separators=(",", ":"), ensure_ascii=False)


def merge_checkpoints(theirs: Sequence[Checkpoint], ours: Sequence[Checkpoint], per_conversation: int,
                      drop_roots: frozenset[str] = frozenset(), drop_digests: frozenset[str] = frozenset(),
                      ) -> list[Checkpoint]:
    """What a replica writes for a session: the store's checkpoints that other replicas wrote and this one does not
    hold (oldest first), then its own, within the store's bounds; those of a conversation this replica ended
    (`drop_digests`: its prefixes) or stopped compacting (`drop_roots`) left out. Found by review: each save wrote
    only the replica's own checkpoints, so two replicas serving one `user:` id erased each other's summaries."""
    mine = {cp.digest for cp in ours}
    out: list[Checkpoint] = []
    for cp in theirs:
        if cp.digest not in mine and cp.root not in drop_roots and cp.digest not in drop_digests:
            out = bounded_checkpoints(out, cp, per_conversation)
    for cp in ours:
        out = bounded_checkpoints(out, cp, per_conversation)
    return out


def decode_checkpoints(raw: str | bytes | None) -> list[Checkpoint]:
    """Checkpoints from the store; an entry that is malformed is dropped (never served)."""
    return checkpoint_rows(raw)[0]


def checkpoint_rows(raw: str | bytes | None) -> tuple[list[Checkpoint], int]:
    """(the well-formed checkpoints in `raw`, how many entries were dropped as malformed). Total, like
    `SessionMeta.decode`: a value that is not UTF-8 JSON, or too deeply nested, is one dropped entry; a row with
    `1e999` or `Infinity` where a count belongs is dropped, never an exception (found by review: one such row failed
    every request of the session with HTTP 400 for the state's TTL)."""
    if raw is None:
        return [], 0
    try:
        rows: Any = json.loads(raw)
    except MALFORMED:
        return [], 1
    if not isinstance(rows, list):
        return [], 1
    out: list[Checkpoint] = []
    for row in rows:
        try:
            summary = row["summary"]
            cp = Checkpoint(digest=str(row["digest"]), replaced=int(row["replaced"]),
                            system_count=int(row["system_count"]),
                            summary=str(summary) if summary is not None else None,
                            summary_tokens=int(row.get("summary_tokens", 0)), root=str(row.get("root", "")))
        except MALFORMED_ROW:
            continue
        if (cp.replaced > cp.system_count >= 0 and cp.summary_tokens >= 0 and len(cp.digest) == 64
                and len(cp.root) in (0, 64)):
            out.append(cp)
    return out, len(rows) - len(out)
