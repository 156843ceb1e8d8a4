"""`_fit` over a fleet whose positions do not all fit in MAX_CURSOR_CHARS, through `merge` with emulated kvsched
engines (sorted ids, `encode_cursor` cursors, as `tests/ray/standin_engine.py` pages). Found by review
(/tmp/rev_diffC/fit_livelock3.py): `_fit` held back a prefix of one order, advanced about one replica a page once the
cursor was full, and on page 8 of this fleet held back all 230 and gave back the very cursor it was sent, with no
rows: a client following next_cursor looped forever."""

from __future__ import annotations

import json
import random
from typing import Any

from kvsched.adapters.ray.listing import MAX_CURSOR_CHARS, merge, parse_listing
from kvsched.core.tenancy import decode_cursor, encode_cursor


def answers(replicas: dict[str, list[str]], query: str) -> tuple[Any, list[tuple[str, dict[str, Any]]]]:
    listing = parse_listing(query)
    limit = int(dict(p.split("=", 1) for p in query.split("&"))["limit"])
    out = []
    for rid, sids in replicas.items():
        pos = listing.positions.get("w", {}).get(rid, "")
        if pos is None:  # as EngineReplica.admin answers for a replica listed to its end
            body: dict[str, Any] = {"sessions": [], "next_cursor": None}
        else:
            after = decode_cursor(pos)[0] if pos else None
            rest = [s for s in sorted(sids) if after is None or s > after]
            nxt = encode_cursor((rest[limit - 1], 0, 0, "", "")) if len(rest) > limit else None
            body = {"sessions": [{"session_id": s} for s in rest[:limit]], "next_cursor": nxt}
        out.append(("w", {"status": 200, "replica_id": rid, "slot": 0, "body": json.dumps(body).encode()}))
    return listing, out


def test_a_full_cursor_still_moves_every_page_and_the_fleet_is_listed() -> None:
    rng = random.Random(3)
    replicas = {f"r{i:03d}": [f"{i}.{j:03d}." + "".join(chr(0x10000 + rng.randrange(0xF0000))
                                                        for _ in range(rng.randrange(60, 120))) for j in range(10)]
                for i in range(230)}
    seen: list[str] = []
    cursor, out = None, {}
    bound = 230 * 11  # at least one replica moves a page: each moves at most 10 times, once more to its end
    for _ in range(bound):
        sent = cursor
        listing, replies = answers(replicas, "limit=1" + (f"&cursor={sent}" if sent else ""))
        status, out = merge(listing, replies, [])
        assert status == 200
        seen += [r["session_id"] for r in out["sessions"]]
        cursor = out["next_cursor"]
        assert cursor is None or len(cursor) <= MAX_CURSOR_CHARS
        assert out["sessions"] or cursor != sent, "the page gave back the cursor it was sent, with no rows"
        if cursor is None:
            break
    assert cursor is None and len(seen) == len(set(seen))
    ended = [e for e in out["errors"] if "over" in e.get("error", "")]
    assert sorted(seen) == sorted(s for sids in replicas.values() for s in sids) or ended
