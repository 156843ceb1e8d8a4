"""Tenant scope of sessions, and the paging of the session list.

A session belongs to its `cache_salt` and, on a server with API keys, to the key that created it (`SessionKey.tenant`
holds `tenant_of(key)`, a fingerprint: the key itself is never stored). A caller sees and ends only sessions of its own
key and salt; a caller holding an admin key (KVSCHED_ADMIN_KEYS) sees and ends every tenant's, narrowed to one salt if
it names one. Another tenant's session is indistinguishable from no session (404), so ids cannot be probed.

The list is sorted by a stable key (id, inferred, branch, tenant, salt digest) and paged with an opaque cursor (the
last row's sort key; a salt appears in it only as a digest).
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import math
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from kvsched.core.env import env_setting
from kvsched.core.sessions import MAX_SESSION_ID_LEN, SessionKey

DEFAULT_PAGE = 100
MAX_PAGE = 1000
T = TypeVar("T")
SortKey = tuple[str, int, int, str, str]


class InvalidQuery(ValueError):
    """A malformed query parameter of the session routes (HTTP 400); `param` names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def tenant_of(api_key: str) -> str:
    """The tenant fingerprint of an API key (as vLLM compares keys: the header's text encoded as UTF-8)."""
    return hashlib.sha256(b"kvsched-tenant\0" + api_key.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def salt_digest(salt: str | None) -> str:
    return "" if salt is None else hashlib.sha256(salt.encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls a session route. `salt_given`: the caller named a salt (None otherwise means "unsalted")."""

    admin: bool = False
    tenant: str | None = None
    cache_salt: str | None = None
    salt_given: bool = False

    def owns(self, key: SessionKey) -> bool:
        if self.admin:
            return not self.salt_given or key.cache_salt == self.cache_salt
        return key.tenant == self.tenant and key.cache_salt == self.cache_salt

    def as_args(self) -> list[Any]:
        """msgpack-able form for the engine-core utility call."""
        return [self.admin, self.tenant, self.cache_salt, self.salt_given]

    @classmethod
    def from_args(cls, args: Any) -> Caller:
        admin, tenant, salt, given = args
        return cls(bool(admin), tenant if isinstance(tenant, str) else None, salt if isinstance(salt, str) else None,
                   bool(given))


def sort_key(key: SessionKey) -> SortKey:
    return (str(key.session_id), int(key.inferred), key.branch, key.tenant or "", salt_digest(key.cache_salt))


def _longest_cursor_chars() -> int:
    """The longest cursor `encode_cursor` gives: a session id of MAX_SESSION_ID_LEN characters of 4 UTF-8 bytes each
    (JSON escapes one as a surrogate pair, 12 characters: the most any character a session id may hold takes), a
    64-bit branch, the tenant fingerprint and the salt digest; base64 without padding. Found by review: a fixed 8,192
    under a comment counting ids of 1,024 characters, over MAX_SESSION_ID_LEN: not derived from what is issued."""
    widest = json.dumps(["", 1, 2**63 - 1, tenant_of(""), salt_digest("")], separators=(",", ":"))
    return math.ceil((len(widest) + 12 * MAX_SESSION_ID_LEN) * 4 / 3)


MAX_CURSOR_CHARS = _longest_cursor_chars()  # 2,144 characters for 128-character ids


def encode_cursor(key: SortKey) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key), separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> SortKey:
    """A cursor this server issued (`encode_cursor`); anything else, however nested or long, is an InvalidQuery
    (found by review: a deeply nested one raised RecursionError, answered 503 "scheduler unavailable")."""
    try:
        if len(raw) > MAX_CURSOR_CHARS:
            raise ValueError(raw[:16])
        data = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        sid, inferred, branch, tenant, salt = data
        if not (isinstance(sid, str) and isinstance(tenant, str) and isinstance(salt, str)
                and type(inferred) is int and type(branch) is int):
            raise ValueError(data)
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError):
        raise InvalidQuery("cursor is not one this server issued (use next_cursor from the previous page)",
                           "cursor") from None
    return (sid, inferred, branch, tenant, salt)


@dataclass(frozen=True, slots=True)
class PageQuery:
    limit: int = DEFAULT_PAGE
    cursor: SortKey | None = None
    summary: bool = False
    pinned_ids: bool = False  # only the ids of the sessions holding pinned KV, all in one answer (a router's index)


def parse_page_query(params: Mapping[str, str]) -> PageQuery:
    """`limit` (1..MAX_PAGE, default DEFAULT_PAGE), `cursor`, `summary` (1/0), `pinned_ids` (1/0). Unknown parameters
    are refused, so a typo does not silently return the first page."""
    unknown = sorted(set(params) - {"limit", "cursor", "summary", "pinned_ids"})
    if unknown:
        raise InvalidQuery(f"unknown query parameter(s) {unknown}; use limit, cursor, summary, pinned_ids",
                           unknown[0][:64])
    limit = DEFAULT_PAGE
    if "limit" in params:
        raw = params["limit"]
        # int('²') fails, and int() of over 4,300 digits raises ValueError (found by review: read as a bad query)
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 8 or not 1 <= int(raw) <= MAX_PAGE:
            raise InvalidQuery(f"limit must be an integer from 1 to {MAX_PAGE}, got {raw[:32]!r}", "limit")
        limit = int(raw)
    summary = params.get("summary", "0").strip().lower()
    if summary not in ("0", "1", "true", "false"):
        raise InvalidQuery(f"summary must be 1 or 0, got {summary[:32]!r}", "summary")
    ids = params.get("pinned_ids", "0").strip().lower()
    if ids not in ("0", "1", "true", "false"):
        raise InvalidQuery(f"pinned_ids must be 1 or 0, got {ids[:32]!r}", "pinned_ids")
    cursor = decode_cursor(params["cursor"]) if params.get("cursor") else None
    return PageQuery(limit, cursor, summary in ("1", "true"), ids in ("1", "true"))


def page(rows: Iterable[tuple[SessionKey, T]], query: PageQuery) -> tuple[list[T], str | None]:
    """The rows after the cursor in sort-key order, at most `query.limit`, and the next page's cursor (None: last).
    O(n log limit): the table is not sorted whole for one page."""
    after = query.cursor
    keyed = ((sort_key(k), row) for k, row in rows)
    candidates = (kr for kr in keyed if after is None or kr[0] > after)
    top = heapq.nsmallest(query.limit + 1, candidates, key=lambda kr: kr[0])
    more = len(top) > query.limit
    top = top[: query.limit]
    return [row for _, row in top], encode_cursor(top[-1][0]) if more else None


def admin_keys_from_env(environ: Mapping[str, str]) -> tuple[str, ...]:
    """KVSCHED_ADMIN_KEYS: comma-separated bearer tokens that may list and end every tenant's sessions."""
    raw = env_setting(environ, "KVSCHED_ADMIN_KEYS")
    if raw is None:
        return ()
    keys = tuple(k.strip() for k in raw.split(",") if k.strip())
    if not keys:
        raise ValueError("KVSCHED_ADMIN_KEYS is set but names no key (a comma-separated list of bearer tokens)")
    return keys


def bearer_token(authorization: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (the header as text: vLLM reads it as Latin-1), None otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    return token if scheme.lower() == "bearer" and token else None


def key_digest(token: str) -> bytes:
    """SHA-256 of a bearer token as vLLM compares keys (the token's text encoded as UTF-8)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def digest_matches(digest: bytes, digests: Iterable[bytes]) -> bool:
    """`digest` is one of `digests`, compared in constant time against every one (no early exit)."""
    found = False
    for d in digests:
        found |= secrets.compare_digest(digest, d)
    return found
