"""Convert Mooncake's published request traces (kvcache-ai/Mooncake, `FAST25-release/traces/*.jsonl`, Apache-2.0) to
the kvsched trace schema (docs/trace_schema.md, section "Imported traces" for the assumptions).

A Mooncake line is `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`: one id per 512-token
block of the prompt (the last one covers a partial block when n is not a multiple of 512), ids remapped prefix hashes
(equal ids = reusable prefix). There are no session ids, roles or output block ids; they are recovered here:

- session: a request continues the session of the latest earlier request it shares its longest prefix with, when
  that shared prefix covers at least `min_shared` of that request's full blocks (a new conversation turn repeats the whole
  history; two users sharing a system prompt share a few leading blocks only). Otherwise it opens a session.
- output: a request's output tokens are taken to be appended to its prompt in its session's next request, so the
  blocks its output completes carry that request's ids at those positions when the next request is long enough to
  hold them and repeats this request's whole prompt; otherwise they get ids of their own (cached, never reused).
- roles, TTL hints and session ends are unknown and left out (the engine would not know a session's last turn
  either).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from kvsched.sim.out_file import written_whole
from kvsched.sim.trace import TraceRequest, TraceWriter
from kvsched.sim.trace_fields import bounded_lines, number_field

BLOCK_SIZE = 512  # tokens per hash id (Mooncake FAST'25 README)
MAX_OUTPUT_TOKENS = 2**24  # one request's output: far past any model's context (the published traces: < 2**12)
DEFAULT_MIN_SHARED = 0.75


@dataclass(frozen=True, slots=True)
class MooncakeRequest:
    t_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def parse(lines: Iterable[str], source: str = "<mooncake>") -> Iterator[MooncakeRequest]:
    """Mooncake JSONL lines as requests; a malformed line raises ValueError naming `source` and its line number. Ids
    must be chained, as the trace schema needs them (an id at one position in every request): a line repeating an id,
    or putting one at another position than an earlier line did, is refused rather than written to a trace that
    `Trace.load` then rejects."""
    position: dict[int, int] = {}  # hash id -> its block index, over the whole file
    # a file is read in bounded lines (one with no line ends must not take all memory); a list as it is
    numbered = bounded_lines(cast(TextIO, lines), source) if hasattr(lines, "readline") else enumerate(lines, start=1)
    for lineno, line in numbered:
        if not line.strip():
            continue
        try:
            req = _request(json.loads(line))
            _check_chained(req.hash_ids, position)
        except KeyError as exc:
            raise ValueError(f"{source}:{lineno}: lacks field {exc.args[0]!r}") from None
        except (ValueError, TypeError, RecursionError) as exc:
            raise ValueError(f"{source}:{lineno}: {exc}") from None
        yield req


def _request(d: Any) -> MooncakeRequest:
    """One line's fields, checked (counts are ints, the timestamp a finite number >= 0)."""
    if not isinstance(d, dict):
        raise ValueError(f"a line must be a JSON object, got {type(d).__name__}")
    ids = d["hash_ids"]
    n, m = number_field(d, "input_length", integer=True), number_field(d, "output_length", 0, integer=True)
    t = number_field(d, "timestamp")
    if not isinstance(ids, list) or not all(type(h) is int for h in ids):
        raise ValueError("hash_ids must be a list of integers")
    if n <= 0:
        raise ValueError("input_length must be > 0")
    if m > MAX_OUTPUT_TOKENS:  # its blocks get ids one by one: 2**40 tokens took all memory (found by review)
        raise ValueError(f"output_length must be at most {MAX_OUTPUT_TOKENS}, got {m}")
    if len(ids) != -(-n // BLOCK_SIZE):
        raise ValueError(f"{len(ids)} hash_ids for input_length {n}: expected one per {BLOCK_SIZE}-token "
                         f"block ({-(-n // BLOCK_SIZE)})")
    return MooncakeRequest(t, n, m, tuple(ids))


def _check_chained(ids: tuple[int, ...], position: dict[int, int]) -> None:
    for k, h in enumerate(ids):
        seen = position.setdefault(h, k)
        if seen != k:
            raise ValueError(f"hash id {h} at block {k} was at block {seen} (in this or an earlier line): ids must "
                             "be chained prefix hashes")


def assign_sessions(reqs: list[MooncakeRequest], min_shared: float = DEFAULT_MIN_SHARED) -> list[int]:
    """Session index of every request (requests in arrival order); see the module docstring for the rule."""
    if not 0.0 < min_shared <= 1.0:
        raise ValueError(f"min_shared must be in (0, 1], got {min_shared}")
    latest: dict[int, int] = {}  # block id -> latest request holding it (ids are chained: always at one position)
    session: list[int] = []
    opened = 0
    for j, r in enumerate(reqs):
        s = None
        for k in range(len(r.hash_ids) - 1, -1, -1):  # the longest prefix shared with any earlier request
            p = latest.get(r.hash_ids[k])
            if p is not None:
                if k + 1 >= min_shared * max(reqs[p].input_length // BLOCK_SIZE, 1):
                    s = session[p]
                break
        if s is None:
            s, opened = opened, opened + 1
        session.append(s)
        for h in r.hash_ids:
            latest[h] = j
    return session


def full_blocks(reqs: list[MooncakeRequest], session: list[int]) -> list[list[Any]]:
    """Every request's full blocks in the trace schema: its prompt's full blocks, then those its output completes
    (ids from the session's next request when it repeats this prompt and holds the output, else ids of their own)."""
    nxt: dict[int, int] = {}
    successor = [-1] * len(reqs)
    for j in range(len(reqs) - 1, -1, -1):
        successor[j] = nxt.get(session[j], -1)
        nxt[session[j]] = j
    out: list[list[Any]] = []
    for j, r in enumerate(reqs):
        nf = r.input_length // BLOCK_SIZE
        end = (r.input_length + r.output_length) // BLOCK_SIZE
        blocks: list[Any] = list(r.hash_ids[:nf])
        s = successor[j]
        if s >= 0 and reqs[s].input_length >= r.input_length + r.output_length and reqs[s].hash_ids[:nf] == r.hash_ids[:nf]:
            blocks += reqs[s].hash_ids[nf:end]
        blocks += [f"out{j}.{k}" for k in range(len(blocks), end)]
        out.append(blocks)
    return out


def convert(src: TextIO, dst: TextIO, source: str = "<mooncake>", min_shared: float = DEFAULT_MIN_SHARED,
            limit: int | None = None) -> dict[str, Any]:
    """Read a Mooncake trace from `src`, write it to `dst` in the kvsched schema; returns the header's `meta`."""
    reqs = list(parse(src, source))
    if not reqs:
        raise ValueError(f"{source}: no requests (an empty file, or blank lines only)")
    reqs.sort(key=lambda r: r.t_ms)  # stable: the file's order within a millisecond
    if limit is not None:
        reqs = reqs[:limit]
    session = assign_sessions(reqs, min_shared)
    blocks = full_blocks(reqs, session)
    turns = [0] * (max(session, default=-1) + 1)
    for s in session:
        turns[s] += 1
    meta = {"source": f"mooncake:{source}", "importer": "kvsched trace import --format mooncake",
            "min_shared": min_shared, "requests": len(reqs), "sessions": len(turns),
            "single_turn_sessions": sum(1 for n in turns if n == 1),
            "assumptions": "sessions from hash chains; 512-token blocks; roles unknown; output tokens appended "
                           "(docs/trace_schema.md)"}
    w = TraceWriter(dst, BLOCK_SIZE, meta)
    for j, r in enumerate(reqs):
        w.write(TraceRequest(t=r.t_ms / 1000.0, session=f"s{session[j]}", prompt_tokens=r.input_length,
                             output_tokens=r.output_length, blocks=[]), full_blocks=blocks[j])
    return meta


def convert_file(src: Path, dst: Path, min_shared: float = DEFAULT_MIN_SHARED, limit: int | None = None
                 ) -> dict[str, Any]:
    """Convert `src` into `dst`, written whole or not at all (`written_whole`); `dst` naming `src` is refused."""
    with open(src) as f_in, written_whole(dst, (src,)) as f_out:
        meta = convert(f_in, f_out, src.name, min_shared, limit)
    return meta


# ---- where the published traces live -------------------------------------------------------------------------------
MOONCAKE_COMMIT = "3b5a594133958449a1feaf1c9e0fc1b553e34a28"
MOONCAKE_URL = f"https://raw.githubusercontent.com/kvcache-ai/Mooncake/{MOONCAKE_COMMIT}/FAST25-release/traces"
# name -> (bytes, sha256) at MOONCAKE_COMMIT. `toolagent_trace.jsonl` is published but was not fetched (yet).
MOONCAKE_FILES = {
    "conversation_trace.jsonl": (3_029_533, "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df"),
    "synthetic_trace.jsonl": (1_136_313, "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131"),
}


def traces_dir() -> Path:
    root = os.environ.get("KVSCHED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvsched")
    return Path(root) / "traces"
