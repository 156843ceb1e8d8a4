"""Session identity: ids, keys, per-request hints, and the validation every entry point applies."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple, NewType

from kvsched.core.unseen import unseen

SessionId = NewType("SessionId", str)

MAX_SESSION_ID_LEN = 128
KNOWN_ROLES = ("orchestrator", "worker", "planner", "critic", "summarizer")


class InvalidSessionInput(ValueError):
    """A request carried a malformed session id, role, TTL or end flag (the API answers HTTP 400).

    `field` names what was wrong (a header, a body field such as `prompt_cache_key`), for the error's `param`."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class SessionKey(NamedTuple):
    """A session as the KV cache sees it: the same id under another cache salt is another session,
    because vLLM never lets blocks hashed under one salt serve another.

    tenant: who created it (an opaque fingerprint of the API key that sent it; None on a server without keys). The
        same id under another key is another session: a tenant can neither use nor end another's.
    branch: a turn under an existing id whose prompt does not continue the session's prefix starts a branch of its
        own (`kvsched.core.lineage`) instead of replacing the session's pin.
    inferred: named by kvsched for a request that named none (session inference); such ids never collide with
        client ids.

    A named tuple, not a dataclass: keys are built and hashed on the engine's per-request path, and a tuple's are
    done in C (a frozen dataclass's `__init__` and `__hash__` run Python code per field)."""

    session_id: SessionId
    cache_salt: str | None = None
    tenant: str | None = None
    branch: int = 0
    inferred: bool = False


@dataclass(frozen=True, slots=True)
class TurnHints:
    """What a request says about its session, validated."""

    role: str | None = None
    ttl_s: float | None = None
    end: bool = False


def shown(raw: object, limit: int = 64) -> str:
    """`raw` for an error message: its repr, cut to `limit` characters (an int of 5,000 digits has none)."""
    try:
        text = repr(raw)
    except ValueError:
        text = f"<{type(raw).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_session_id(raw: object) -> SessionId:
    """Return `raw` as a SessionId, or raise InvalidSessionInput saying what is wrong with it."""
    if not isinstance(raw, str):
        raise InvalidSessionInput(f"session id must be a string, got {type(raw).__name__}")
    if not raw:
        raise InvalidSessionInput("session id must not be empty")
    if len(raw) > MAX_SESSION_ID_LEN:
        raise InvalidSessionInput(f"session id is {len(raw)} characters long; the limit is {MAX_SESSION_ID_LEN}")
    for ch in raw:
        if ord(ch) < 0x20 or ord(ch) == 0x7F or 0x80 <= ord(ch) < 0xA0:
            raise InvalidSessionInput(f"session id contains a control character (U+{ord(ch):04X})")
        if 0xD800 <= ord(ch) < 0xE000:  # a lone surrogate ("\ud800" in JSON): no UTF-8 carries it to the engine
            raise InvalidSessionInput(f"session id contains a lone surrogate (U+{ord(ch):04X})")
    if not raw.isascii() and (why := unseen(raw)) is not None:  # ids that print alike: kvsched/core/unseen.py
        raise InvalidSessionInput(why)
    if raw != raw.strip():
        raise InvalidSessionInput("session id must not start or end with white space")
    return SessionId(raw)


def validate_role(raw: object) -> str:
    """The role, lower-cased; checked after lowering ("İ" lowers to "i" + a combining dot, which is no word)."""
    role = raw.lower() if isinstance(raw, str) else raw
    if not isinstance(role, str) or not role or len(role) > 64 or not role.replace("-", "").replace("_", "").isalnum():
        raise InvalidSessionInput(f"agent_role must be a short word (letters, digits, - or _), got {shown(raw)}")
    return role


_DECIMAL = re.compile(r"\+?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def validate_ttl(raw: object) -> float:
    """A TTL hint in seconds: a finite number >= 0 (strings from headers are parsed: ASCII decimal notation only, as
    `parse_duration` takes; found by review: float() took "١٢", full-width digits and "1_000")."""
    if isinstance(raw, str) and not _DECIMAL.fullmatch(raw):
        raise InvalidSessionInput(f"ttl_s must be a number of seconds, got {shown(raw)}")
    try:
        value = float(raw)  # type: ignore[arg-type]
    except OverflowError:  # an integer past float's range (10**400): no finite TTL
        value = math.inf
    except (TypeError, ValueError):
        raise InvalidSessionInput(f"ttl_s must be a number of seconds, got {shown(raw)}") from None
    if isinstance(raw, bool) or not math.isfinite(value) or value < 0:
        raise InvalidSessionInput(f"ttl_s must be a finite number of seconds >= 0, got {shown(raw)}")
    return value


def validate_end_flag(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in ("0", "1", "true", "false", "yes", "no"):
        return raw.strip().lower() in ("1", "true", "yes")
    raise InvalidSessionInput(f"session end flag must be 0/1, true/false or yes/no, got {raw!r}")
