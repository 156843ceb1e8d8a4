"""GET /kvsched/sessions through the ingress, over engine replicas in this process (kvsched's `EngineReplica` code
over a stand-in vLLM server, `standin_engine.py`; broadcast as Ray's handle does): the caller's query reaches every
replica, pages continue across replicas with one cursor, and an engine's refusal is not turned into an empty 200.
Found by review (test_list_sessions.py): a caller without a key on a pool that checks keys got 200 and [], and
`limit`, `cursor` and `summary` were dropped with `next_cursor`."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import zlib
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from kvsched.adapters.ray.listing import (
    MAX_CURSOR_CHARS,
    MAX_POSITIONS_BYTES,
    decode_positions,
    encode_positions,
)
from kvsched.core.tenancy import decode_cursor, encode_cursor, salt_digest, tenant_of
from tests.ray.standin_engine import FakeVllm, StandInEngine
from tests.ray.test_ingress_handles import POOL, make_ingress, request

KEYED = dict(POOL, vllm_args=["--api-key", "k1"])


class ReplicasHandle:
    """One pool's DeploymentHandle over replicas in this process: `broadcast` calls the method on each (one that
    is `down` raises, as Ray hands back a replica's failure)."""

    def __init__(self, replicas: list[StandInEngine]) -> None:
        self.replicas, self.down, self.calls = replicas, set(), []

    def broadcast(self, method: str, *args: Any, **kw: Any) -> Any:
        self.calls.append((method, args, kw))

        async def one(r: StandInEngine) -> Any:
            if r.replica_id in self.down:
                from ray.exceptions import ActorUnavailableError
                raise ActorUnavailableError("down", None)
            return await getattr(r, method)(*args, **kw)

        async def results_async(return_exceptions: bool = False) -> list:
            return list(await asyncio.gather(*(one(r) for r in self.replicas), return_exceptions=True))

        return SimpleNamespace(results_async=results_async)


def pool(n: int, sessions: list[list[str]], keyed: bool = False, name: str = "w") -> ReplicasHandle:
    replicas = [StandInEngine(name, KEYED if keyed else POOL, replica_id=f"{name}{i}") for i in range(n)]
    for r, sids in zip(replicas, sessions, strict=True):
        for sid in sids:
            r.vllm.sessions[("k1" if keyed else None, sid)] = 1
    return ReplicasHandle(replicas)


def listing(ing: Any, query: str = "", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = request(headers or {}, method="GET", path="/kvsched/sessions")
    req.scope["query_string"] = query.encode()
    res = asyncio.run(ing.sessions(req))
    return res.status_code, json.loads(res.body)


def test_an_engines_refusal_is_passed_on_not_turned_into_an_empty_list() -> None:
    keyed = pool(2, [["a"], ["b"]], keyed=True)
    ing = make_ingress({"w": keyed}, [KEYED])
    assert listing(ing)[0] == 401
    status, body = listing(ing, headers={"authorization": "Bearer k1"})
    assert status == 200 and sorted(r["session_id"] for r in body["sessions"]) == ["a", "b"]
    assert listing(ing, "limit=x", {"authorization": "Bearer k1"})[0] == 400  # vLLM's refusal of a bad query
    keyed.down = {"w0", "w1"}
    status, body = listing(ing, headers={"authorization": "Bearer k1"})
    assert status == 503 and "retry" in body["error"]["message"]


def test_with_one_pool_open_and_one_keyed_the_refusal_is_named_beside_the_open_pools_sessions() -> None:
    ing = make_ingress({"w": pool(1, [["a"]]), "k": pool(1, [["b"]], keyed=True, name="k")},
                       [POOL, dict(KEYED, name="k")])
    status, body = listing(ing)
    assert status == 200 and [(r["pool"], r["session_id"]) for r in body["sessions"]] == [("w", "a")]
    assert [(e["pool"], e["status"]) for e in body["errors"]] == [("k", 401)]


def pages(ing: Any, query: str) -> list[Any]:
    out, cursor = [], None
    for _ in range(20):
        status, body = listing(ing, query + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        out.append(body)
        cursor = body["next_cursor"]
        if cursor is None:
            return out
    raise AssertionError("the cursor never ended")


def test_pages_continue_on_every_replica_with_one_cursor_and_end() -> None:
    a, b = [f"a{i}" for i in range(5)], [f"b{i}" for i in range(3)]
    handle = pool(2, [a, b])
    got = pages(make_ingress({"w": handle}), "limit=2")
    assert [sorted(r["session_id"] for r in p["sessions"]) for p in got] == [
        ["a0", "a1", "b0", "b1"], ["a2", "a3", "b2"], ["a4"]]  # up to `limit` of each replica per page
    assert {r["slot"] for p in got for r in p["sessions"]} == {0} and got[0]["sessions"][0]["pool"] == "w"
    assert all(kw["pages"] == {} or set(kw["pages"]) == {"w0", "w1"} for _, _, kw in handle.calls)
    assert all(args[1].startswith("/kvsched/sessions?limit=2") for _, args, _ in handle.calls)


def test_a_replica_that_failed_a_page_is_asked_again_and_a_new_one_starts_from_its_first_session() -> None:
    handle = pool(2, [[f"a{i}" for i in range(4)], [f"b{i}" for i in range(4)]])
    ing = make_ingress({"w": handle})
    status, first = listing(ing, "limit=2")
    handle.down = {"w1"}
    status, second = listing(ing, f"limit=2&cursor={first['next_cursor']}")
    assert status == 200 and [r["session_id"] for r in second["sessions"]] == ["a2", "a3"]
    assert second["errors"] == [{"pool": "w", "error": "ActorUnavailableError"}]
    handle.down = set()
    handle.replicas.append(StandInEngine("w", POOL, replica_id="w2"))  # scaled up meanwhile
    handle.replicas[2].vllm.sessions[(None, "c0")] = 1
    status, third = listing(ing, f"limit=2&cursor={second['next_cursor']}")
    assert sorted(r["session_id"] for r in third["sessions"]) == ["b2", "b3", "c0"] and third["next_cursor"] is None


def answering(replica: StandInEngine, status: int) -> httpx.AsyncClient:
    """The replica's engine answers every request with `status` (as kvsched's admin route answers 503 when the
    scheduler is busy) until its client, returned, is put back."""
    real = replica.client
    replica.client = httpx.AsyncClient(base_url=replica.server.base, transport=httpx.MockTransport(
        lambda _: httpx.Response(status, json={"error": {"message": f"answered {status}"}})))
    return real


@pytest.mark.parametrize("a_sessions", [4, 6])
def test_a_replica_that_answers_a_page_with_503_keeps_its_place(a_sessions: int) -> None:
    """Found by review: only a replica that raised kept its position; one whose engine answered 503 lost it, so the
    listing ended before its last sessions (4: w0 was done) or listed it again from its first (6: duplicates)."""
    handle = pool(2, [[f"a{i}" for i in range(a_sessions)], [f"b{i}" for i in range(4)]])
    ing = make_ingress({"w": handle})
    _, first = listing(ing, "limit=2")
    real = answering(handle.replicas[1], 503)
    _, second = listing(ing, f"limit=2&cursor={first['next_cursor']}")
    assert [(e["pool"], e["status"]) for e in second["errors"]] == [("w", 503)] and second["next_cursor"]
    handle.replicas[1].client = real
    rest = pages(ing, f"limit=2&cursor={second['next_cursor']}")
    seen = [r["session_id"] for p in [first, second, *rest] for r in p["sessions"]]
    assert sorted(seen) == sorted([f"a{i}" for i in range(a_sessions)] + [f"b{i}" for i in range(4)])


@pytest.mark.parametrize("how", ["503", "raised"])
def test_a_replica_that_failed_its_first_page_is_listed_though_the_others_are_done(how: str) -> None:
    """Found by review: a replica the cursor did not name yet that failed a page was left out of next_cursor, so
    with every other replica done the listing ended without it."""
    handle = pool(2, [["a0"], ["b0"]])
    ing = make_ingress({"w": handle})
    real = answering(handle.replicas[1], 503) if how == "503" else None
    handle.down = {"w1"} if how == "raised" else set()
    _, first = listing(ing, "limit=2")
    assert [r["session_id"] for r in first["sessions"]] == ["a0"] and first["next_cursor"]
    handle.down, handle.replicas[1].client = set(), real or handle.replicas[1].client
    _, second = listing(ing, f"limit=2&cursor={first['next_cursor']}")
    assert [r["session_id"] for r in second["sessions"]] == ["b0"] and second["next_cursor"] is None


def test_a_replica_that_refuses_the_caller_keeps_its_place_but_not_the_listing_open() -> None:
    """A 4xx of the engine (401: the caller's key is not one it takes; 400) is the caller's to fix: the replica is
    asked again where it stood while the others list on (named in `errors` each time it refuses), but it does not
    keep the listing open on its own (asked again it would refuse again)."""
    handle = pool(2, [[f"a{i}" for i in range(6)], [f"b{i}" for i in range(4)]])
    ing = make_ingress({"w": handle})
    _, first = listing(ing, "limit=2")
    real = answering(handle.replicas[1], 401)
    _, second = listing(ing, f"limit=2&cursor={first['next_cursor']}")
    assert [r["session_id"] for r in second["sessions"]] == ["a2", "a3"]
    assert [(e["pool"], e["status"]) for e in second["errors"]] == [("w", 401)]
    _, third = listing(ing, f"limit=2&cursor={second['next_cursor']}")
    assert [r["session_id"] for r in third["sessions"]] == ["a4", "a5"] and third["next_cursor"] is None
    handle.replicas[1].client = real  # page 3 again, the caller taken: w1 from where it stopped
    _, again = listing(ing, f"limit=2&cursor={second['next_cursor']}")
    assert sorted(r["session_id"] for r in again["sessions"]) == ["a4", "a5", "b2", "b3"]


class EngineCursors(FakeVllm):
    """Pages as kvsched's engines do: `next_cursor` is `encode_cursor` of the last row's sort key."""

    def handle(self, request: httpx.Request) -> httpx.Response:
        if cursor := request.url.params.get("cursor"):
            request = httpx.Request(request.method, request.url.copy_set_param("cursor", decode_cursor(cursor)[0]),
                                    headers=request.headers)
        answer = super().handle(request)
        body = json.loads(answer.content)
        if body.get("next_cursor"):
            body["next_cursor"] = encode_cursor((body["next_cursor"], 0, 0, tenant_of("k"), salt_digest("s")))
        return httpx.Response(answer.status_code, json=body)


def id_of(replica: int, session: int, chars: str) -> str:
    """A 128-character session id (the longest valid) of `chars` cycled, or of any 4-byte characters (""): deflating
    leaves them near 4 bytes each, some 115 replicas' positions in MAX_CURSOR_CHARS."""
    head, rng = f"{replica}.{session}.", random.Random(replica * 3 + session)
    if not chars:
        return head + "".join(chr(0x10000 + rng.randrange(0xF0000)) for _ in range(128 - len(head)))
    return head + "".join(chars[(replica * 7 + session * 3 + i) % len(chars)] for i in range(128 - len(head)))


@pytest.mark.parametrize(("replicas", "chars"), [
    (400, "0123456789abcdef-"),  # about uuid-like ids
    (24, "\U0001F600"),  # one 4-byte character: an engine cursor of 2,100 characters each
    (300, ""),  # the cursor holds some replicas back a page
])
def test_the_cursor_stays_short_enough_to_come_back_on_any_fleet(replicas: int, chars: str) -> None:
    """Found by review: the cursor held every engine cursor base64'd again, and every replica done as null, so it
    outgrew the ingress's own limit (400 replicas with 36-character ids, 7 with 1,000-character non-ASCII ones): 400
    on page 2. Now compact; past MAX_CURSOR_CHARS (the URL a server parses) replicas are held back a page."""
    reps = [StandInEngine("w", POOL, replica_id=f"r{i:03d}abcdef") for i in range(replicas)]
    for i, r in enumerate(reps):
        r.vllm = EngineCursors(set())
        r.client = httpx.AsyncClient(base_url=r.server.base, transport=httpx.MockTransport(r.vllm.handle))
        r.vllm.sessions.update({(None, id_of(i, j, chars)): 1 for j in range(3)})
    ing = make_ingress({"w": ReplicasHandle(reps)})
    seen, cursor, longest, n = [], None, 0, 0
    while n < 30:
        n += 1
        status, body = listing(ing, "limit=1" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200, body
        seen += [r["session_id"] for r in body["sessions"]]
        cursor = body["next_cursor"]
        longest = max(longest, len(cursor or ""))
        if cursor is None:
            break
    assert longest <= MAX_CURSOR_CHARS and len(seen) == len(set(seen)) == 3 * replicas
    assert (n > 3) == (chars == "")  # three sessions a replica, one a page: held back, more pages


def test_a_listing_whose_cursor_cannot_fit_ends_saying_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the names of some 7,000 replicas no cursor fits: the page ends the listing and `errors` says so, rather
    than giving a cursor the ingress would refuse."""
    monkeypatch.setattr("kvsched.adapters.ray.listing.MAX_CURSOR_CHARS", 8)
    status, body = listing(make_ingress({"w": pool(2, [["a0", "a1"], ["b0"]])}), "limit=1")
    assert status == 200 and body["next_cursor"] is None and len(body["sessions"]) == 2
    assert "over 8 characters" in body["errors"][0]["error"]


def deflated(raw: bytes) -> str:
    return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")


NESTED = base64.urlsafe_b64encode(b"[" * 40_000).decode()  # within the size bound, past json's recursion limit
CRAFTED = [deflated(b"[" * 100_000), deflated(b'{"w":{"r":1}}'), deflated(b'{"w":{"r":["a",0,0,"t"]}}'),
           deflated(b'{"w":{"r":"' + b"a" * (MAX_POSITIONS_BYTES * 8) + b'"}}'),  # inflates 8x past the bound
           deflated(b'{"w":{}}') + "AAAA"]  # the limits' own tests: what a client may craft is a 400


# [], {"w":{"r":1}} in base64, no longer the ingress's cursors
@pytest.mark.parametrize("cursor", ["x", "W10", "eyJ3Ijp7InIiOjF9fQ", "W" * 70_000, NESTED, *CRAFTED])
def test_a_cursor_the_ingress_did_not_give_is_400(cursor: str) -> None:
    status, body = listing(make_ingress({"w": pool(1, [["a"]])}), f"cursor={cursor}")
    assert (status, body["error"]["param"]) == (400, "cursor")


def test_a_positions_cursor_round_trips_and_a_kvsched_engines_cursor_is_held_decoded() -> None:
    engine = encode_cursor(("\u00e9" * 100, 0, 3, tenant_of("k"), salt_digest("s")))
    positions = {"w": {"r0": engine, "r1": None, "r2": "", "r3": "another engine's"}, "k": {"r4": None}}
    cursor = encode_positions(positions)
    assert decode_positions(cursor) == positions and len(cursor) < len(engine) / 2


def test_summary_is_summed_over_the_replicas_and_each_replicas_answer_kept() -> None:
    status, body = listing(make_ingress({"w": pool(2, [["a", "b"], ["c"]])}), "summary=1")
    assert status == 200 and body["summary"] == {"sessions": 3}
    assert sorted(r["summary"]["sessions"] for r in body["replicas"]) == [1, 2]


@pytest.mark.parametrize("how", ["503", "raised"])
def test_a_replica_that_fails_every_page_gets_503s_then_is_given_up_and_the_listing_ends(how: str) -> None:
    """Found by review (/tmp/rev_diffC/test_listing_spin.py): w0 listed to its end answers a canned empty 200 (it
    is not asked), which counted as an answer, so with w1 failing every page the listing answered 200 with the same
    cursor forever. Now a page on which every replica asked failed is 503 with Retry-After (the caller's cursor
    still good), and a replica failing 3 pages in a row is given up, named in `errors`, so the listing ends."""
    handle = pool(2, [["a0"], ["b0"]])
    ing = make_ingress({"w": handle})
    if how == "503":
        answering(handle.replicas[1], 503)
    handle.down = {"w1"} if how == "raised" else set()
    seen, statuses, cursor, body = [], [], None, {}
    for _ in range(10):
        sent = cursor
        req = request({}, method="GET", path="/kvsched/sessions")
        req.scope["query_string"] = ("limit=2" + (f"&cursor={sent}" if sent else "")).encode()
        res = asyncio.run(ing.sessions(req))
        body = json.loads(res.body)
        statuses.append(res.status_code)
        if res.status_code == 503:
            assert int(res.headers["retry-after"]) >= 1 and "retry" in body["error"]["message"]
            assert listing(ing, f"limit=2&cursor={sent}")[0] == 503  # the same cursor again: the same answer
        seen += [r["session_id"] for r in body.get("sessions", [])]
        if (cursor := body.get("next_cursor")) is None:
            break
    assert statuses == [200, 503, 200] and seen == ["a0"] and cursor is None
    assert any("given up" in e["error"] for e in body["errors"])
