"""Traces in token-block space: what every request sent, as chained prefix-block ids, and when.

A trace is JSONL (schema in docs/trace_schema.md): a header line, then one request per line in any order (replay sorts
by `t`). Each request names its session and lists the ids of its full KV blocks (prompt, then the blocks its output
completes but for its last token, whose KV is never computed: `computed_blocks`). Block ids are chained prefix hashes:
two requests share a cached block exactly when they carry the same id, and an id always sits at the same position
(block index) in any request. To keep multi-turn traces small, a request may start with `reuse`: that many leading
blocks are the same as its session's previous request's.

In memory (`Trace`), ids are dense ints 0..n_ids-1 and each request's block list is a view into an append-only tape
shared with the session's earlier turns, so a 50-turn, 50k-token session costs its distinct blocks, not the sum of its
requests.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO, TypeGuard

import numpy as np

from kvsched.sim.out_file import written_whole
from kvsched.sim.trace_fields import (
    BYTES_META,
    CAPACITY_META,
    FORMAT_VERSION,
    TIER_BLOCK_META,
    bounded_lines,
    flag_field,
    number_field,
    optional_column,
    read_header,
    text_field,
)

ID_DTYPE = np.int32
logger = logging.getLogger("kvsched.sim")


@dataclass(slots=True)
class TraceRequest:
    """One request as written in a trace line (block ids are the raw ids of the file, or dense ints when generated)."""

    t: float
    session: str
    prompt_tokens: int
    output_tokens: int
    blocks: Sequence[Any]  # ids of full blocks after the `reuse` leading ones
    reuse: int = 0
    role: str | None = None
    ttl_s: float | None = None
    end: bool = False
    salt: str | None = None
    duration_s: float | None = None  # measured arrival-to-finish time; replay then holds the blocks that long
    compacted: bool = False  # served rewritten by kvsched's compaction (the engine then ends the branch it leaves)
    # tokens of its session's previous request's partial last block this prompt repeats (recorded: the tier's tail
    # restore; None: not known, the replay assumes the turn appends to that request)
    tail_reuse: int | None = None
    joins_pin: bool = False  # repeated its shared inferred session's last prompt: its answer pinned beside (recorded)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 6), "session": self.session, "prompt_tokens": self.prompt_tokens,
                               "output_tokens": self.output_tokens}
        if self.reuse:
            out["reuse"] = self.reuse
        out["blocks"] = [int(b) if isinstance(b, np.integer) else b for b in self.blocks]
        for name in ("role", "ttl_s", "salt", "duration_s", "tail_reuse"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        for name in ("end", "compacted", "joins_pin"):  # flags: written when set
            if getattr(self, name):
                out[name] = True
        return out

    @classmethod
    def from_json(cls, d: Any) -> TraceRequest:
        """A trace line, checked field by field: a wrong type or an absurd number is refused, never coerced."""
        if not isinstance(d, dict):
            raise ValueError(f"a request line must be a JSON object, got {type(d).__name__}")
        blocks = d.get("blocks", [])
        if not isinstance(blocks, list) or not {type(b) for b in blocks} <= {str, int}:
            raise ValueError(f"blocks must be a list of block ids (strings or integers), got {blocks!r:.80}")
        try:
            return cls(t=number_field(d, "t"), session=text_field(d, "session", optional=False),
                       prompt_tokens=number_field(d, "prompt_tokens", integer=True),
                       output_tokens=number_field(d, "output_tokens", 0, integer=True), blocks=blocks,
                       reuse=number_field(d, "reuse", 0, integer=True), role=text_field(d, "role"),
                       ttl_s=number_field(d, "ttl_s", None), end=flag_field(d, "end"), salt=text_field(d, "salt"),
                       duration_s=number_field(d, "duration_s", None), compacted=flag_field(d, "compacted"),
                       tail_reuse=number_field(d, "tail_reuse", None, integer=True),
                       joins_pin=flag_field(d, "joins_pin"))
        except KeyError as exc:
            raise ValueError(f"trace request lacks field {exc.args[0]!r}: {d}"[:200]) from None


def _positive(value: Any) -> TypeGuard[float]:
    """A positive number as a header's meta writes it (not a bool, not a string)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def chain_hashes(token_ids: Sequence[int], block_size: int, salt: str | None = None) -> list[str]:
    """Chained prefix hashes (16 hex digits) of the full blocks of `token_ids`, for turning agent logs into traces.

    Block i's id hashes block i-1's id and the block's own tokens, as vLLM's prefix cache does, so equal ids mean equal
    prefixes."""
    out: list[str] = []
    prev = (salt or "").encode()
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(prev, digest_size=8)
        h.update(np.asarray(token_ids[start:start + block_size], dtype=np.int64).tobytes())
        prev = h.digest()
        out.append(prev.hex())
    return out


def computed_blocks(prompt_tokens: int, output_tokens: int, block_size: int) -> int:
    """Full blocks whose KV a finished request computed, the most its trace line may list: its prompt's, and its
    output's but for the last sampled token, never fed back (the engine recorder's rule,
    `compat.finished_request_shape`; found by review: the generator and importer listed one more)."""
    return max(prompt_tokens // block_size, (prompt_tokens + output_tokens - 1) // block_size)


def shared_prefix_len(previous: Sequence[Any], blocks: Sequence[Any]) -> int:
    """How many leading block ids `blocks` shares with `previous` (a request's `reuse` against its session's last)."""
    n = 0
    for a, b in zip(previous, blocks, strict=False):
        if a != b:
            break
        n += 1
    return n


class TraceWriter:
    """Writes a trace; given each request's full block list, it fills `reuse` against the session's previous one."""

    def __init__(self, stream: TextIO, block_size: int, meta: dict[str, Any] | None = None) -> None:
        self.stream = stream
        self.previous: dict[tuple[str, str | None], Sequence[Any]] = {}
        header = {"kvsched_trace": FORMAT_VERSION, "block_size": block_size, "meta": meta or {}}
        stream.write(json.dumps(header) + "\n")

    def write(self, req: TraceRequest, full_blocks: Sequence[Any] | None = None) -> int:
        """Write `req`; pass `full_blocks` (all of the request's block ids) to have the delta computed here. Returns
        the characters written."""
        if full_blocks is not None:
            n = shared_prefix_len(self.previous.get((req.session, req.salt), ()), full_blocks)
            req.reuse, req.blocks = n, list(full_blocks[n:])
            self.previous[(req.session, req.salt)] = full_blocks
        return self.stream.write(json.dumps(req.to_json(), separators=(",", ":")) + "\n")


def write_jsonl(path: Path, block_size: int, requests: Iterable[TraceRequest], meta: dict[str, Any] | None = None
                ) -> None:
    with written_whole(path) as f:  # a trace cut short would read as a shorter trace
        w = TraceWriter(f, block_size, meta)
        for r in requests:
            w.write(r)


def read_jsonl(path: Path) -> tuple[dict[str, Any], Iterator[TraceRequest]]:
    """(header, requests) of a trace file; requests are read lazily, a malformed one raises ValueError naming
    `path:line` and the field."""
    f = open(path)  # noqa: SIM115 - closed by the generator below
    lines = bounded_lines(f, str(path))
    try:
        first = next(lines, (1, ""))[1]
        header = read_header(first, path)
    except (ValueError, OSError):
        f.close()
        raise

    def requests() -> Iterator[TraceRequest]:
        with f:
            for lineno, line in lines:
                if line.strip():
                    try:
                        parsed = json.loads(line)
                    except (ValueError, RecursionError) as exc:
                        if not line.endswith("\n"):  # the last line cut short: a recording stopped by a full disk
                            # or a kill (found by review: the whole trace was refused)
                            logger.warning("%s:%d: the last line is cut short (%s); replaying the lines before it",
                                           path, lineno, exc)
                            return
                        raise ValueError(f"{path}:{lineno}: {exc}") from None
                    try:
                        yield TraceRequest.from_json(parsed)
                    except (ValueError, TypeError, RecursionError) as exc:
                        raise ValueError(f"{path}:{lineno}: {exc}") from None

    return header, requests()


class _Tape:
    """An append-only int array; requests hold (tape, length) and read `buf[:length]`."""

    __slots__ = ("buf", "n")

    def __init__(self, initial: np.ndarray) -> None:
        self.buf = np.empty(max(64, 2 * len(initial)), dtype=ID_DTYPE)
        self.buf[: len(initial)] = initial
        self.n = len(initial)

    def extend(self, more: np.ndarray) -> None:
        need = self.n + len(more)
        if need > len(self.buf):
            buf = np.empty(max(need, 2 * len(self.buf)), dtype=ID_DTYPE)
            buf[: self.n] = self.buf[: self.n]
            self.buf = buf
        self.buf[self.n:need] = more
        self.n = need


@dataclass(slots=True)
class Trace:
    """A trace loaded for replay: per-request columns sorted by arrival, dense block ids, per-session keys."""

    block_size: int
    t: np.ndarray  # float64 arrival times, non-decreasing
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    session: np.ndarray  # int32 index into `sessions`
    end: np.ndarray  # bool
    ttl_s: np.ndarray  # float64, NaN = no hint
    role: list[str | None]
    sessions: list[tuple[str, str | None]]  # (session id, cache salt)
    n_ids: int
    depth: np.ndarray  # block index every id sits at
    _tape: list[_Tape] = field(repr=False)
    _where: np.ndarray = field(repr=False)  # (n, 2): tape index, number of blocks
    meta: dict[str, Any] = field(default_factory=dict)
    duration_s: np.ndarray | None = None  # float64 measured arrival-to-finish seconds, NaN = use the time model
    compacted: np.ndarray | None = None  # bool: served rewritten by kvsched's compaction (None: none was)
    tail_reuse: np.ndarray | None = None  # int64 TraceRequest.tail_reuse, -1 = not known (None: none is)
    joins_pin: np.ndarray | None = None  # bool TraceRequest.joins_pin (None: none did)

    def __len__(self) -> int:
        return len(self.t)

    def blocks(self, i: int) -> np.ndarray:
        """Dense ids of request i's full blocks (prompt blocks first, then those its output completes)."""
        tape, n = self._where[i]
        ids: np.ndarray = self._tape[tape].buf[:n]
        return ids

    @property
    def recorded_capacity_blocks(self) -> int | None:
        """The pool of the engine that recorded this trace (`KVSCHED_RECORD_TRACE`), if its header says one."""
        value = self.meta.get(CAPACITY_META)
        return value if type(value) is int and value > 0 else None

    @property
    def recorded_bytes(self) -> tuple[int, int | None] | None:
        """(KV bytes per token, FP8-tier bytes per block) of the engine that recorded this trace, if its header says
        the first: the byte figures and tier sizes of a replay follow that engine rather than a preset model. The
        second is None for an engine the FP8 tier does not serve (MLA, sliding window: no tier figure in its header;
        found by review: its bytes per token were dropped with it, for the default preset's)."""
        per_token, per_block = self.meta.get(BYTES_META), self.meta.get(TIER_BLOCK_META)
        if not _positive(per_token):
            return None
        return round(per_token), (int(per_block) if _positive(per_block) else None)

    def working_set_blocks(self) -> int:
        """Distinct blocks over the whole trace (shared prefixes counted once): the KV every session would hold."""
        return self.n_ids

    def peak_live_blocks(self) -> int:
        """The most blocks live at once: used by an earlier request and used again later (each block's reuse interval,
        from its first to its last request, in arrival order). A pool this large lets a clairvoyant policy keep every
        reuse (less the running requests' own blocks); sizing pools from it, not from the distinct blocks (3-20x more
        on production traces, whose most sessions never return), makes "pressure 2x" mean the same on any trace."""
        n = len(self)
        first = np.full(self.n_ids, n, dtype=np.int64)
        last = np.full(self.n_ids, -1, dtype=np.int64)
        for i in range(n):
            b = self.blocks(i)
            first[b] = np.minimum(first[b], i)
            last[b] = i  # requests are in arrival order
        reused = last > first
        delta = np.zeros(n + 1, dtype=np.int64)
        np.add.at(delta, first[reused], 1)
        np.add.at(delta, last[reused] + 1, -1)
        return int(np.cumsum(delta).max()) if n else 0

    def subset(self, keep: np.ndarray) -> Trace:
        """The requests where `keep` (a bool mask over requests) is set, in the same order; ids, tapes and the session
        table are shared (a replica's share of the trace)."""
        idx = np.flatnonzero(keep)
        return replace(self, t=self.t[idx], prompt_tokens=self.prompt_tokens[idx],
                       output_tokens=self.output_tokens[idx], session=self.session[idx], end=self.end[idx],
                       ttl_s=self.ttl_s[idx], role=[self.role[i] for i in idx], _where=self._where[idx],
                       duration_s=None if self.duration_s is None else self.duration_s[idx],
                       compacted=None if self.compacted is None else self.compacted[idx],
                       tail_reuse=None if self.tail_reuse is None else self.tail_reuse[idx],
                       joins_pin=None if self.joins_pin is None else self.joins_pin[idx])

    @classmethod
    def from_requests(cls, block_size: int, requests: Iterable[TraceRequest], meta: dict[str, Any] | None = None,
                      dense_ids: bool = False) -> Trace:
        """Build from requests in session order (a session's turns in the order it sent them).

        `dense_ids`: the ids are already 0..n-1 ints (the generator's); otherwise any hashable ids are mapped, per
        cache salt (found by review: equal ids under two salts shared blocks, contrary to docs/trace_schema.md)."""
        reqs = list(requests)
        ids: dict[tuple[str | None, Any], int] = {}  # (salt, id)
        depth = np.full(1024, -1, dtype=np.int64)
        n_ids = 0
        tapes: list[_Tape] = []
        where = np.zeros((len(reqs), 2), dtype=np.int64)
        last: dict[tuple[str, str | None], tuple[int, int]] = {}  # session -> (tape, n) of its previous request
        sess_index: dict[tuple[str, str | None], int] = {}
        for i, r in enumerate(reqs):
            key = (r.session, r.salt)
            sess_index.setdefault(key, len(sess_index))
            if dense_ids:
                new = np.asarray(r.blocks, dtype=ID_DTYPE)
                n_ids = max(n_ids, int(new.max()) + 1) if len(new) else n_ids
            else:
                out = []
                for b in r.blocks:
                    j = ids.get((r.salt, b))
                    if j is None:
                        j = ids[(r.salt, b)] = len(ids)
                    out.append(j)
                new = np.asarray(out, dtype=ID_DTYPE)
                n_ids = len(ids)
            prev = last.get(key)
            if r.reuse:
                if prev is None or r.reuse > prev[1]:
                    raise ValueError(f"request {i} of session {r.session!r} reuses {r.reuse} blocks; "
                                     f"its previous request has {0 if prev is None else prev[1]}")
                tape = tapes[prev[0]]
                if prev[1] == r.reuse == tape.n:
                    tape.extend(new)
                    ti = prev[0]
                else:
                    tapes.append(_Tape(np.concatenate([tape.buf[: r.reuse], new])))
                    ti = len(tapes) - 1
            else:
                tapes.append(_Tape(new))
                ti = len(tapes) - 1
            n = r.reuse + len(new)
            most = computed_blocks(r.prompt_tokens, r.output_tokens, block_size)
            if n < r.prompt_tokens // block_size or n > most:
                raise ValueError(f"request {i} of session {r.session!r}: {n} blocks, but prompt_tokens "
                                 f"{r.prompt_tokens} and output_tokens {r.output_tokens} make "
                                 f"{r.prompt_tokens // block_size}..{most} (no KV for the last sampled token)")
            where[i] = (ti, n)
            last[key] = (ti, n)
            # Chained ids sit at one position: check the new ones (reused ones were checked when first seen).
            if len(depth) < n_ids:
                depth = np.concatenate([depth, np.full(max(n_ids, 2 * len(depth)) - len(depth), -1, np.int64)])
            pos = np.arange(r.reuse, n)
            d = depth[new]
            fresh = d < 0
            depth[new[fresh]] = pos[fresh]
            # checked after the assignment: an id twice in this request's new blocks (both fresh) is caught too (found
            # by review: the replay crashed on it, or counted one block held twice)
            if np.any(depth[new] != pos):
                raise ValueError(f"request {i} of session {r.session!r}: a block id appears at two positions; "
                                 "ids must be chained prefix hashes")
        order = np.argsort(np.array([r.t for r in reqs], dtype=np.float64), kind="stable")
        sessions = [k for k, _ in sorted(sess_index.items(), key=lambda kv: kv[1])]
        return cls(
            block_size=block_size,
            t=np.array([reqs[i].t for i in order], dtype=np.float64),
            prompt_tokens=np.array([reqs[i].prompt_tokens for i in order], dtype=np.int64),
            output_tokens=np.array([reqs[i].output_tokens for i in order], dtype=np.int64),
            session=np.array([sess_index[(reqs[i].session, reqs[i].salt)] for i in order], dtype=np.int32),
            end=np.array([reqs[i].end for i in order], dtype=bool),
            ttl_s=np.array([np.nan if reqs[i].ttl_s is None else reqs[i].ttl_s for i in order], dtype=np.float64),
            role=[reqs[i].role for i in order],
            sessions=sessions, n_ids=n_ids, depth=depth[:n_ids].copy(), _tape=tapes, _where=where[order],
            meta=dict(meta or {}),
            duration_s=optional_column([reqs[i].duration_s for i in order], np.float64),
            compacted=optional_column([reqs[i].compacted for i in order], bool),
            tail_reuse=optional_column([reqs[i].tail_reuse for i in order], np.int64),
            joins_pin=optional_column([reqs[i].joins_pin for i in order], bool),
        )

    @classmethod
    def load(cls, path: Path) -> Trace:
        header, requests = read_jsonl(path)
        reqs = list(requests)
        reqs.sort(key=lambda r: r.t)  # a session's own order (by t, then file order) is what `reuse` refers to
        try:
            return cls.from_requests(header["block_size"], reqs, meta=header["meta"])
        except ValueError as exc:  # an older Mooncake conversion can list a block the loader now refuses: say so
            from kvsched.sim.mooncake import stale_note

            note = stale_note(header["meta"])
            raise ValueError(f"{path}: {exc}" + (f"; {note}" if note else "")) from None
