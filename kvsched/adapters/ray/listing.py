"""`GET /kvsched/sessions` through the ingress: every engine replica's answer to the caller's query, merged into one.

Found by review: the ingress asked every replica for their first page whatever the caller's `limit`, `cursor` or
`summary`, dropped `next_cursor`, and skipped every answer but a 200, so a caller without a key on a pool that checks
keys got 200 and an empty list. Now:
- the caller's query goes to every replica (`limit`, `summary`, `pinned_ids`; the engines refuse an unknown parameter
  with 400); a page holds up to `limit` sessions of each replica, each row naming its pool and slot;
- `next_cursor` is the ingress's own: each replica's engine cursor, by pool and Ray replica id, in one opaque string
  (a replica listed to its end is marked done and not asked again; one the cursor does not name, started since,
  is listed from its first session); null once every replica is done. It stays under MAX_CURSOR_CHARS, the URL
  a server parses: when the positions of every replica do not fit (about 115 replicas in the middle of their lists
  at 128-character ids of 4-byte characters, 420 at 128 ASCII ones, 1,400 at uuids), some wait a page (`_fit`);
- when no replica asked answered 200 (one listed to its end is not asked: its canned empty 200 is no answer), the
  first engine answer refusing the caller (401, 400, ...) is passed on, else 503 with Retry-After and `next_cursor`
  (the caller's cursor stays good: a retry continues); a replica failing MAX_FAILED_PAGES pages in a row (a count
  the cursor carries) is given up, named in `errors`, and marked done, so the listing can end; with some 200s the
  others are named in `errors`, and the next page asks again, from where it stood, a
  replica that answered an engine error (5xx, 408, 429, an answer that is no JSON object) and, in a pool of which a
  replica raised (no answer: Ray names no replica), those of its replicas that did not answer (a replica not named
  yet is asked from its first session); while one is to be asked again, `next_cursor` is not null. A replica that
  refused the caller (another 4xx: 401 for a key it does not take, 400: the caller's to fix) is asked again where
  it stood while others have more to list (named in `errors` each time), but does not hold the listing open.
  Found by review: only replicas that raised kept their positions, so a replica answering 503 was listed again from
  its first session (duplicates) or, the others done, never to its end.

Pure: query text and answers in, the query to send and the merged answer out.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from kvsched.core.client_fields import repeated_param
from kvsched.core.tenancy import InvalidQuery, decode_cursor, encode_cursor

MAX_QUERY_FIELDS = 8  # as the engines' session routes
# The cursor comes back in the URL, and uvicorn's parser (httptools: Ray Serve's proxy, uvicorn[standard]) refuses a
# URL over 65,535 bytes (httpx, a client, one over 65,536): the ingress gives no cursor longer than this (`_fit`) and
# refuses one longer with 400.
MAX_CURSOR_CHARS = 60_000
# The cursor's JSON once inflated (zlib inflates up to ~1,000x): bounds a crafted cursor's cost to a 400 after a
# millisecond's inflating and parsing; the ingress gives no cursor past it either (`_fit`).
MAX_POSITIONS_BYTES = 2**20
NEW_REPLICAS_ROOM = 0.1  # of MAX_CURSOR_CHARS, kept for started replicas when one starts (`_fit`)
# pool -> Ray replica id -> engine cursor (None: listed to its end; "": from its first session, `cursor=` to the
# engine); replica id "": the pool's replicas that raised unnamed (Ray names no replica), kept while the pool fails
Positions = dict[str, dict[str, str | None]]
# (pool, Ray replica id) -> pages failed in a row (5xx, 408, 429, no JSON object, raised); MAX_FAILED_PAGES: given up
Failures = dict[tuple[str, str], int]
MAX_FAILED_PAGES = 3
RETRY_AFTER_S = 1  # the Retry-After of a 503: every replica asked failed the page


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
    failures: Failures = field(default_factory=dict)

    @property
    def path(self) -> str:
        return "/kvsched/sessions" + (f"?{self.query}" if self.query else "")


def parse_listing(query_string: str) -> Listing:
    try:
        params = parse_qsl(query_string, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise ListingError(f"at most {MAX_QUERY_FIELDS} query parameters", "query") from None
    if (twice := repeated_param(params)) is not None:  # as each engine (the cursor would be one of two here)
        raise ListingError(f"query parameter {twice[:64]!r} is given more than once: give it once", twice[:64])
    cursor = dict(params).get("cursor") or None
    paged = not any(k in ("summary", "pinned_ids") and v.strip().lower() in ("1", "true") for k, v in params)
    positions, failures = _decode(cursor) if cursor and paged else ({}, {})
    return Listing(urlencode([(k, v) for k, v in params if k != "cursor"]), positions, paged, failures)


def encode_positions(positions: Positions, failures: Failures | None = None) -> str:
    """The positions as one opaque string, compact (found by review: each engine cursor was base64'd again and
    every replica listed to its end stayed in as null, so 7 replicas with 1,000-character non-ASCII ids, or 400 with
    36-character ids, gave a cursor over the ingress's own limit: 400 on page 2): JSON, a kvsched engine's cursor
    as its sort key (decoded: its id as UTF-8, not base64 of JSON escapes), a done replica as 0, one that failed
    n pages in a row as [position, n], deflated, base64."""
    return _pack(positions, failures or {})[0]


def _pack(positions: Positions, failures: Failures) -> tuple[str, int]:
    """(cursor, bytes of its JSON)."""
    wire = {pool: {r: [_wire(c), failures[pool, r]] if failures.get((pool, r)) else _wire(c) for r, c in reps.items()}
            for pool, reps in positions.items()}
    raw = json.dumps(wire, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("="), len(raw)


def _wire(cursor: str | None) -> Any:
    if cursor is None:
        return 0
    try:
        key = decode_cursor(cursor)
    except InvalidQuery:
        return cursor  # another engine's: as it is
    return list(key) if encode_cursor(key) == cursor else cursor


def decode_positions(cursor: str) -> Positions:
    return _decode(cursor)[0]


def _decode(cursor: str) -> tuple[Positions, Failures]:
    """A cursor this ingress issued; anything else is a ListingError (400), after at most MAX_CURSOR_CHARS of base64
    and MAX_POSITIONS_BYTES of JSON, however it was crafted."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        inflate = zlib.decompressobj()
        raw = inflate.decompress(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)), MAX_POSITIONS_BYTES)
        if inflate.unconsumed_tail or inflate.unused_data or not inflate.eof:
            raise ValueError("inflates past MAX_POSITIONS_BYTES, or is not one deflated stream")
        data = json.loads(raw.decode("utf-8", "surrogatepass"))
        failures: Failures = {}
        for pool, reps in data.items():
            for r, c in reps.items():
                if isinstance(c, list) and len(c) == 2 and type(c[1]) is int and 0 < c[1] < MAX_FAILED_PAGES:
                    failures[str(pool), str(r)] = c[1]
        return {str(pool): {str(r): _position(c[0] if (str(pool), str(r)) in failures else c)
                            for r, c in reps.items()} for pool, reps in data.items()}, failures
    except (ValueError, TypeError, AttributeError, zlib.error, RecursionError):
        raise ListingError("cursor is not a next_cursor this ingress gave", "cursor") from None


def _position(value: Any) -> str | None:
    if type(value) is int and value == 0:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 5:
        sid, inferred, branch, tenant, salt = value
        if isinstance(sid, str) and type(inferred) is int and type(branch) is int and isinstance(tenant, str) \
                and isinstance(salt, str):
            return encode_cursor((sid, inferred, branch, tenant, salt))
    raise ValueError("not a position")


def merge(listing: Listing, answers: Sequence[tuple[str, Mapping[str, Any]]],
          failed: Sequence[tuple[str, BaseException]]) -> tuple[int, Any]:
    """(200, merged answer) when some replica asked answered 200 (or none was to be asked: nothing to list); else
    the first engine answer refusing the caller (its status, its raw body), or 503 (with `next_cursor`, which counts
    the failed page) when every replica asked failed: a replica listed to its end is not asked, and its canned empty
    200 (`EngineReplica.admin`) is no answer (found by review: it counted as one, so a replica failing every page
    held the listing open with 200 and the same cursor forever)."""
    listed: list[tuple[str, Mapping[str, Any], dict[str, Any]]] = []
    refused: list[tuple[str, Mapping[str, Any]]] = []
    for pool, a in answers:
        body = _json(a.get("body")) if a.get("status") == 200 else None
        if body is not None:
            listed.append((pool, a, body))
        else:
            refused.append((pool, a))
    asked = [x for x in listed if listing.positions.get(x[0], {}).get(str(x[1].get("replica_id", "")), "") is not None]
    caller = next((a for _, a in refused if refused_the_caller(a.get("status"))), None)
    if not asked and caller is not None:
        return int(caller["status"]), caller.get("body", b"")
    errors = [{"pool": pool, "slot": a.get("slot"), "status": a.get("status"), "error": _message(a.get("body"))}
              for pool, a in refused] + [{"pool": pool, "error": type(exc).__name__} for pool, exc in failed]
    page = _pages(listing, listed, refused, {pool for pool, _ in failed}, errors) if listing.paged else None
    if not asked and (refused or failed) and (page is None or page["next_cursor"] is not None):
        return 503, {"error": {"message": f"every engine replica asked failed ({len(refused)} answered an error, "
                                          f"{len(failed)} did not answer): retry after {RETRY_AFTER_S} s with the "
                                          f"same cursor, or with next_cursor, which counts this failure (a replica "
                                          f"failing {MAX_FAILED_PAGES} pages in a row is given up)",
                               "type": "server_error"},
                     "errors": errors} | ({"next_cursor": page["next_cursor"]} if page else {})
    return 200, (page if page is not None else _totals(listed)) | {"errors": errors}


def refused_the_caller(status: Any) -> bool:
    """An engine's 4xx but for 408 and 429: the caller's query or key, refused again if asked again."""
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _pages(listing: Listing, listed: list[tuple[str, Mapping[str, Any], dict[str, Any]]],
           refused: list[tuple[str, Mapping[str, Any]]], failing: set[str], errors: list[dict[str, Any]]
           ) -> dict[str, Any]:
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    positions: Positions = {}
    failures: Failures = {}

    def failed_again(pool: str, replica: str, previous: str | None) -> None:
        """Asked again from where it stood, or given up after MAX_FAILED_PAGES failed pages in a row."""
        n = listing.failures.get((pool, replica), 0) + 1
        positions.setdefault(pool, {})[replica] = previous if n < MAX_FAILED_PAGES else None
        if n < MAX_FAILED_PAGES:
            failures[pool, replica] = n
        else:
            errors.append({"pool": pool, "replica_id": replica or None,
                           "error": f"given up after {n} failed pages in a row: not listed to its end"})

    for pool, a, body in listed:
        replica = str(a.get("replica_id", ""))
        rows[pool, replica] = [dict(s, pool=pool, slot=a.get("slot")) for s in body.get("sessions", [])
                               if isinstance(s, dict)]
        cursor = body.get("next_cursor")
        positions.setdefault(pool, {})[replica] = cursor if isinstance(cursor, str) and cursor else None
    callers = []  # refused the caller: asked again where it stood while others list on, not holding the listing
    for pool, a in refused:  # an engine error: asked again from where it stood
        replica = str(a.get("replica_id", ""))
        previous = listing.positions.get(pool, {}).get(replica, "")
        if refused_the_caller(a.get("status")):
            callers += [(pool, replica, previous)] if previous else []
        else:
            failed_again(pool, replica, previous)
    answered = {(pool, str(a.get("replica_id", ""))) for pool, a in [(p, a) for p, a, _ in listed] + refused}
    for pool in failing:  # the replicas that did not answer this time may be the ones that failed: asked again
        before = listing.positions.get(pool, {})
        for replica, cursor in before.items():
            if (pool, replica) in answered or not replica:
                continue
            if cursor is None:
                positions.setdefault(pool, {})[replica] = None
            else:
                failed_again(pool, replica, cursor)
        # and one not named yet (Ray names no replica that raised): "" holds the pool's count while it fails
        if before.get("", "") is None:
            positions.setdefault(pool, {})[""] = None
        else:
            failed_again(pool, "", "")
    more = any(c is not None for pool in positions.values() for c in pool.values())
    for pool, replica, previous in callers:
        positions.setdefault(pool, {})[replica] = previous
    cursor, held = _fit(listing, positions, failures, rows) if more else (None, set())
    if more and cursor is None:
        errors.append({"error": f"the listing's next_cursor would be over {MAX_CURSOR_CHARS} characters: it ends "
                                f"here, not listed to its end (list with summary=1, or per pool)"})
    return {"sessions": [r for k, page in rows.items() if k not in held for r in page], "next_cursor": cursor}


def _fit(listing: Listing, positions: Positions, failures: Failures, rows: Mapping[tuple[str, str], Any]
         ) -> tuple[str | None, set[tuple[str, str]]]:
    """(the next cursor, the replicas held back), within MAX_CURSOR_CHARS and MAX_POSITIONS_BYTES: when the
    positions of every replica listed this page do not fit, some are held back, this page's rows of each left out
    and its previous position kept (one that started this page leaves the cursor: a replica it does not name is
    listed from its first session). Which advance is greedy by how much each changes the cursor's JSON: those listed
    to their end and those whose position shrinks first, then as many of the others as fit, those the cursor names
    before those it does not (a replica starts only while the cursor leaves NEW_REPLICAS_ROOM of MAX_CURSOR_CHARS
    for the started ones' longer ids: filled to the brim, no started replica could move). At least one replica
    that answered moves each page (found by review: holding back a prefix of one order advanced about one replica a
    page once the cursor was full, and at 230 replicas of 4-byte ids gave back the very cursor it was sent, with no
    rows, forever); (None, no replica) when none can (the names of some 7,000 replicas): the listing ends."""
    def entry(pool: str, replica: str, cursor: str | None) -> int:
        return len(json.dumps([replica, _wire(cursor)], ensure_ascii=False).encode("utf-8", "surrogatepass"))

    def before(k: tuple[str, str]) -> str | None:
        return listing.positions.get(k[0], {}).get(k[1])

    moving = [k for k in rows if rows[k] or positions[k[0]][k[1]] != before(k)]
    growth = {k: entry(*k, positions[k[0]][k[1]]) - (entry(*k, before(k)) if before(k) else 0) for k in moving}
    order = sorted(moving, key=lambda k: (growth[k] > 0 and not before(k), growth[k]))
    started = sum(growth[k] <= 0 or bool(before(k)) for k in order)

    def attempt(n: int) -> str | None:  # the first n of `order` advance, the others are held back
        trial = {pool: dict(reps) for pool, reps in positions.items()}
        for pool, replica in order[n:]:
            if previous := before((pool, replica)):
                trial[pool][replica] = previous
            else:
                del trial[pool][replica]
        cursor, size = _pack(trial, failures)
        room = 1.0 if n <= started else 1 - NEW_REPLICAS_ROOM
        return cursor if len(cursor) <= MAX_CURSOR_CHARS * room and size <= MAX_POSITIONS_BYTES else None

    if (cursor := attempt(len(order))) is not None:
        return cursor, set()
    low = max(1, sum(growth[k] <= 0 for k in order)) if order else 0
    if (cursor := attempt(low)) is None:
        return None, set()
    high = len(order)
    while low + 1 < high:  # the most that fit past those that shrink it (deflating is near enough monotonic)
        mid = (low + high) // 2
        low, high = (mid, high) if attempt(mid) is not None else (low, mid)
    return attempt(low), set(order[low:])


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
