"""Recording the requests an engine serves as a trace (docs/trace_schema.md), so that `kvsched simulate` can replay a
deployment's own traffic: LRU, kvsched and OPT on the pools and settings it is considering, with or without the tier.

Engine-agnostic: the vLLM adapter (`kvsched.adapters.vllm.trace_recorder`) feeds it arrivals and finishes. Nothing of a
prompt is written: a block's id is a keyed hash of the engine's own chained block hash, a session's a keyed hash of its
identity (id, cache salt, tenant), under a random key made per recording and never written, so ids can be matched
within one file and not against anything else. Lengths, times, roles and TTL hints are written as they were (an end or
a role the engine ignored, on an inferred session another conversation shares, as none; such a turn's TTL as applied).

Lines are written when requests finish, which is not always in arrival order (a session's side request may finish
after its next turn started). `reuse` refers to the session's previous request *by arrival*, so a request is written
as a delta only when that previous one is known: already written, and no earlier request of the session still running;
otherwise with all its block ids (`reuse` 0), which is always right.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from kvsched.sim.trace import TraceRequest, TraceWriter

ID_BYTES = 8
# What is kept to write a session's next request as a delta, in 8-byte units: its block ids (8 bytes each), the tokens
# of its partial last block (8 bytes each, to count how many its next request repeats) and ENTRY_OVERHEAD per session
# (the entry, its key and the engine's last hash it holds: ~300-390 bytes measured, found by review to be uncounted, so
# that sessions of no block piled up unbounded). Past it the least recently active sessions are forgotten (their next
# request is then written with all its ids). 4M: 32 MB, e.g. 1,000 sessions of 64k tokens in 16-token blocks, or
# 100,000 sessions of no block.
MAX_KEPT_BLOCKS = 4_000_000
ENTRY_OVERHEAD = 40


@dataclass(slots=True)
class _Last:
    """A session's latest-arriving written request: when it arrived, its blocks' keyed ids and its last raw hash (the
    engine's hashes are chained: a request whose block k-1 equals it repeats all k blocks)."""

    t: float
    ids: bytes  # keyed 64-bit ids, 8 bytes each
    last_raw: Hashable | None
    tail: bytes = b""  # the tokens of its partial last block (its KV past its full blocks), int64: never written

    @property
    def kept(self) -> int:
        """8-byte units it holds (ids, tail tokens and the entry itself), counted against MAX_KEPT_BLOCKS."""
        return (len(self.ids) + len(self.tail)) // ID_BYTES + ENTRY_OVERHEAD


@dataclass(slots=True)
class _Live:
    t: float
    session: str
    salt: str | None
    named: bool = True  # False: a request of no session, a session of its own that never has a next request
    joins_pin: bool = False  # it repeated its shared inferred session's last prompt (`SessionRecord.joins_pin`)


@dataclass(slots=True)
class Finished:
    """What a finished request adds to the recording (the adapter reads it off the engine's request)."""

    prompt_tokens: int
    output_tokens: int
    blocks: Sequence[Hashable]  # the engine's hashes of the request's full KV blocks, prefix order
    role: str | None = None
    ttl_s: float | None = None
    end: bool = False
    compacted: bool = False
    tokens: Sequence[int] | None = None  # every token (prompt, then output): the tail's, compared, never written


@dataclass
class TraceRecording:
    """Requests written as they finish; `arrived` must see each before `finished` (same clock)."""

    stream: TextIO
    block_size: int
    meta: dict[str, Any] = field(default_factory=dict)
    key: bytes = field(default_factory=lambda: os.urandom(16))
    max_kept_blocks: int = MAX_KEPT_BLOCKS
    max_chars: int | None = None  # the recording stops (`full`) once its lines reach this size
    written: int = 0
    chars: int = 0
    full: bool = False

    def __post_init__(self) -> None:
        self._writer = TraceWriter(self.stream, self.block_size, {**self.meta, "anonymized": True})
        self._t0: float | None = None
        self._live: dict[str, _Live] = {}  # request id -> its arrival
        self._running: dict[str, list[float]] = {}  # session -> arrivals of its requests not yet written
        self._last: OrderedDict[str, _Last] = OrderedDict()  # session -> its latest-arriving written request
        self._kept = 0  # ids held in `_last`
        self._keyed = hashlib.blake2b(key=self.key, digest_size=ID_BYTES)

    def _hashed(self, values: Sequence[object]) -> bytes:
        """The keyed 64-bit hashes of `values` (bytes as they are, the engine's block hashes; anything else by its
        repr), concatenated."""
        keyed = self._keyed  # the key's block compressed once: a copy per value
        out = []
        for v in values:
            h = keyed.copy()
            h.update(v if type(v) is bytes else repr(v).encode())
            out.append(h.digest())
        return b"".join(out)

    def token(self, value: object) -> str:
        """A keyed 64-bit hash of `value` in hex, as the file writes ids."""
        return self._hashed((value,)).hex()

    def arrived(self, request_id: str, now: float, session: object | None, salt: str | None,
                joins_pin: bool = False) -> None:
        """A request arrived for `session` (any hashable identity; None: a request of no session, written as a
        session of its own) under cache salt `salt`; `joins_pin`: it repeated the last prompt of an inferred session
        another conversation shares, so the engine pins its answer beside the other's (a replay does the same)."""
        if self.full:
            return
        if self._t0 is None:
            self._t0 = now
        token = self.token(("session", session)) if session is not None else "r" + self.token(("request", request_id))
        self._live[request_id] = _Live(now, token, None if salt is None else self.token(("salt", salt)),
                                       session is not None, joins_pin)
        self._running.setdefault(token, []).append(now)

    def abandoned(self, request_id: str) -> None:
        """A request that never ran (aborted while it waited): nothing is written, and it holds no place among its
        session's running requests."""
        live = self._live.pop(request_id, None)
        if live is not None:
            self._not_running(live)

    def _not_running(self, live: _Live) -> None:
        running = self._running.get(live.session, [])
        if live.t in running:
            running.remove(live.t)
        if not running:
            self._running.pop(live.session, None)

    def finished(self, request_id: str, now: float, req: Finished) -> bool:
        """Write the request's line; False if its arrival was never seen (it is then left out) or the recording is
        full (nothing more is written)."""
        live = self._live.pop(request_id, None)
        if live is None or self._t0 is None or self.full:
            return False
        session, t = live.session, live.t
        self._not_running(live)
        running = self._running.get(session, [])
        prev = self._last.get(session)
        ids, n = self._ids(prev, req.blocks)
        delta = prev is not None and prev.t < t and not any(a < t for a in running)
        reuse = n if delta else 0
        self.chars += self._writer.write(TraceRequest(
            t=t - self._t0, session=session, prompt_tokens=req.prompt_tokens, output_tokens=req.output_tokens,
            blocks=_hex_ids(ids[reuse * ID_BYTES:]), reuse=reuse, role=req.role, ttl_s=req.ttl_s, end=req.end,
            salt=live.salt, duration_s=round(max(now - t, 0.0), 6), compacted=req.compacted,
            tail_reuse=self._tail_reuse(prev, n, req), joins_pin=live.joins_pin))
        self.written += 1
        if self.max_chars is not None and self.chars >= self.max_chars:
            self.stop()
            return True
        if req.end or not live.named:  # found by review: kept for ever, one entry per request of no session
            self._forget(session)
        elif prev is None or t > prev.t:
            self._forget(session)
            self._last[session] = _Last(t, ids, req.blocks[-1] if req.blocks else None, self._tail(req))
            self._kept += self._last[session].kept
            while self._kept > self.max_kept_blocks and len(self._last) > 1:
                self._forget(next(iter(self._last)))
        return True

    def _ids(self, prev: _Last | None, blocks: Sequence[Hashable]) -> tuple[bytes, int]:
        """The request's keyed ids and how many lead it in common with `prev`. A turn that extends its session's last
        request (block k-1 equal to its last) hashes only its new blocks; any other hashes all of them and finds the
        common prefix by bisection (chained ids: equal at i means equal before i)."""
        if prev is not None and prev.last_raw is not None:
            k = len(prev.ids) // ID_BYTES
            if len(blocks) >= k and blocks[k - 1] == prev.last_raw:
                return prev.ids + self._hashed(blocks[k:]), k
        ids = self._hashed(blocks)
        if prev is None:
            return ids, 0
        a, b = memoryview(ids), memoryview(prev.ids)
        lo, hi = 0, min(len(a), len(b)) // ID_BYTES  # the common prefix's length is in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            at = (mid - 1) * ID_BYTES
            if a[at:at + ID_BYTES] == b[at:at + ID_BYTES]:
                lo = mid
            else:
                hi = mid - 1
        return ids, lo

    def _tail(self, req: Finished) -> bytes:
        """The request's KV past its full blocks, when less than a block after at least one (the tier's tail)."""
        start, end = len(req.blocks) * self.block_size, req.prompt_tokens + req.output_tokens - 1
        if req.tokens is None or not req.blocks or not 0 < end - start < self.block_size:
            return b""
        return array("q", req.tokens[start:end]).tobytes()

    def _tail_reuse(self, prev: _Last | None, shared: int, req: Finished) -> int | None:
        """How many tokens of `prev`'s tail the request's prompt repeats right after all of `prev`'s full blocks
        (`shared` of them lead the request); None when it does not continue them or either has no tokens known."""
        if prev is None or not prev.tail or req.tokens is None or shared * ID_BYTES != len(prev.ids):
            return None
        start = shared * self.block_size
        end = min(req.prompt_tokens - 1, start + len(prev.tail) // 8)  # (the last prompt token is always computed)
        cur = array("q", req.tokens[start:end]).tobytes() if end > start else b""
        if prev.tail.startswith(cur):  # the usual case: all of it (compared as bytes, no loop)
            return len(cur) // 8
        n = 0
        while cur[8 * n:8 * n + 8] == prev.tail[8 * n:8 * n + 8]:
            n += 1
        return n

    def stop(self) -> None:
        """Nothing more is recorded (`full`): what was kept for later lines is let go (found by review: a stopped
        recording held it as long as the engine ran)."""
        self.full = True
        self._live.clear()
        self._running.clear()
        self._last.clear()
        self._kept = 0

    def _forget(self, session: str) -> None:
        gone = self._last.pop(session, None)
        if gone is not None:
            self._kept -= gone.kept


def _hex_ids(ids: bytes) -> list[str]:
    h = ids.hex()
    n = 2 * ID_BYTES
    return [h[i:i + n] for i in range(0, len(h), n)]
