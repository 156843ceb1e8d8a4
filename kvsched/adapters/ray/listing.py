"""`GET /kvsched/sessions` through the ingress: every engine replica's answer to the caller's query, merged into one.

Found by review: the ingress asked every replica for their first page whatever the caller's `limit`, `cursor` or
`summary`, dropped `next_cursor`, and skipped every answer but a 200, so a caller without a key on a pool that checks
keys got 200 and an empty list. Now:
- the caller's query goes to every replica (`limit`, `summary`, `pinned_ids`; the engines refuse an unknown parameter
  with 400); a page holds up to `limit` sessions of each replica, each row naming its pool and slot;
- `next_cursor` is the ingress's own: each replica's engine cursor, by pool and Ray replica id, in one opaque string
  (a replica listed to its end is marked done and not asked again; one the cursor does not name, started since,
  is listed from its first session); null once every replica is done;
- when no replica answered 200, the first engine answer (401, 400, ...) is passed on, or 503 when replicas failed to
  answer; with some 200s the others are named in `errors`, and the next page asks again, from where it stood, a
  replica that answered an engine error (5xx, 408, 429, an answer that is no JSON object) and, in a pool of which a
  replica raised (no answer: Ray names no replica), those of its replicas that did not answer (a replica not named
  yet is asked from its first session); while one is to be asked again, `next_cursor` is not null. A replica that
  refused the caller (another 4xx: 401 for a key it does not take, 400) would refuse again: it is marked done.
  Found by review: only replicas that raised kept their positions, so a replica answering 503 was listed again from
  its first session (duplicates) or, the others done, never to its end.

Pure: query text and answers in, the query to send and the merged answer out.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

MAX_QUERY_FIELDS = 8  # as the engines' session routes
MAX_CURSOR_CHARS = 65_536
# pool -> Ray replica id -> engine cursor (None: listed to its end; "": from its first session, `cursor=` to the engine)
Positions = dict[str, dict[str, str | None]]


class ListingError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Listing:
    """`query`: what every replica is asked (the caller's query without `cursor`); `positions`: where each replica
    stands (from the caller's cursor); `paged`: a page of sessions (not `summary` nor `pinned_ids`)."""

    query: str = ""
    positions: Positions = field(default_factory=dict)
    paged: bool = True

    @property
    def path(self) -> str:
        return "/kvsched/sessions" + (f"?{self.query}" if self.query else "")


def parse_listing(query_string: str) -> Listing:
    try:
        params = parse_qsl(query_string, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise ListingError(f"at most {MAX_QUERY_FIELDS} query parameters", "query") from None
    cursor = dict(params).get("cursor") or None
    paged = not any(k in ("summary", "pinned_ids") and v.strip().lower() in ("1", "true") for k, v in params)
    return Listing(urlencode([(k, v) for k, v in params if k != "cursor"]),
                   decode_positions(cursor) if cursor and paged else {}, paged)


def encode_positions(positions: Positions) -> str:
    raw = json.dumps(positions, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_positions(cursor: str) -> Positions:
    """A cursor this ingress issued; anything else is a ListingError (400)."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        data = None
    if not isinstance(data, dict) or not all(
            isinstance(pool, dict) and all(isinstance(c, str | None) for c in pool.values()) for pool in data.values()):
        raise ListingError("cursor is not a next_cursor this ingress gave", "cursor")
    return {str(name): {str(r): c for r, c in pool.items()} for name, pool in data.items()}


def merge(listing: Listing, answers: Sequence[tuple[str, Mapping[str, Any]]],
          failed: Sequence[tuple[str, BaseException]]) -> tuple[int, Any]:
    """(200, merged answer) when some replica answered 200 (or no replica is running: nothing to list); else the
    first other engine answer (its status, its raw body), or (503, message) when replicas failed to answer."""
    listed: list[tuple[str, Mapping[str, Any], dict[str, Any]]] = []
    refused: list[tuple[str, Mapping[str, Any]]] = []
    for pool, a in answers:
        body = _json(a.get("body")) if a.get("status") == 200 else None
        if body is not None:
            listed.append((pool, a, body))
        else:
            refused.append((pool, a))
    if not listed and refused:
        first = next((a for _, a in refused if a.get("status") != 200), None)
        if first is None:
            return 502, "an engine replica's answer was not a JSON object"
        return int(first["status"]), first.get("body", b"")
    if not listed and failed:
        return 503, f"{len(failed)} engine replica(s) did not answer ({type(failed[0][1]).__name__}); retry"
    errors = [{"pool": pool, "slot": a.get("slot"), "status": a.get("status"), "error": _message(a.get("body"))}
              for pool, a in refused] + [{"pool": pool, "error": type(exc).__name__} for pool, exc in failed]
    if listing.paged:
        return 200, _pages(listing, listed, refused, {pool for pool, _ in failed}) | {"errors": errors}
    return 200, _totals(listed) | {"errors": errors}


def refused_the_caller(status: Any) -> bool:
    """An engine's 4xx but for 408 and 429: the caller's query or key, refused again if asked again."""
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _pages(listing: Listing, listed: list[tuple[str, Mapping[str, Any], dict[str, Any]]],
           refused: list[tuple[str, Mapping[str, Any]]], failing: set[str]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    positions: Positions = {}
    for pool, a, body in listed:
        rows += [dict(s, pool=pool, slot=a.get("slot")) for s in body.get("sessions", []) if isinstance(s, dict)]
        cursor = body.get("next_cursor")
        positions.setdefault(pool, {})[str(a.get("replica_id", ""))] = cursor if isinstance(cursor, str) else None
    for pool, a in refused:  # asked again from where it stood, unless it refused the caller
        replica = str(a.get("replica_id", ""))
        again = listing.positions.get(pool, {}).get(replica, "")
        positions.setdefault(pool, {})[replica] = None if refused_the_caller(a.get("status")) else again
    for pool in failing:  # the replicas that did not answer this time may be the ones that failed: asked again
        for replica, cursor in listing.positions.get(pool, {}).items():
            positions.setdefault(pool, {}).setdefault(replica, cursor)
    more = bool(failing) or any(c is not None for pool in positions.values() for c in pool.values())
    return {"sessions": rows, "next_cursor": encode_positions(positions) if more else None}


def _totals(listed: list[tuple[str, Mapping[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """`summary=1`: the counts summed over the replicas (a session pinned on two replicas counts on each);
    `pinned_ids=1`: the ids pinned anywhere. Each replica's own answer under `replicas`."""
    summary: dict[str, float] = {}
    ids: set[str] = set()
    for _, _, body in listed:
        for k, v in (body.get("summary") or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                summary[k] = summary.get(k, 0) + v
        ids.update(str(i) for i in body.get("pinned_session_ids") or ())
    out: dict[str, Any] = {"summary": summary} if any("summary" in b for _, _, b in listed) else {}
    if any("pinned_session_ids" in b for _, _, b in listed):
        out["pinned_session_ids"] = sorted(ids)
    return out | {"replicas": [{"pool": pool, "slot": a.get("slot"), "replica_id": a.get("replica_id"), **body}
                               for pool, a, body in listed]}


def _json(body: Any) -> Any:
    try:
        data = json.loads(body)
    except (TypeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _message(body: Any) -> str:
    data = _json(body)
    err = data.get("error") if data else None
    text = err.get("message") if isinstance(err, dict) else err
    if text is None and isinstance(body, bytes | str):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
    return str(text)[:300]
