"""Convert Mooncake's published request traces (kvcache-ai/Mooncake, `FAST25-release/traces/*.jsonl`, Apache-2.0) to
the kvsched trace schema (docs/trace_schema.md, section "Imported traces" for the assumptions).

A Mooncake line is `{"timestamp": ms, "input_length": n, "output_length": m, "hash_ids": [...]}`: one id per 512-token
block of the prompt (the last one covers a partial block when n is not a multiple of 512), ids remapped prefix hashes
(equal ids = reusable prefix). There are no session ids, roles or output block ids; they are recovered here:

- session: a request continues the session of the latest request that arrived strictly earlier (a later timestamp:
  a next turn needs its parent's output) it shares its longest prefix with, when that shared prefix covers at least
  `min_shared` of that request's full blocks (a new conversation turn repeats the whole history; two users sharing a
  system prompt share a few leading blocks only) and ends past the file's common prefixes. A common prefix block is one
  the file's prompts continue in more than `COMMON_FANOUT` distinct ways (a system prompt: conversation_trace's block
  0 starts all 12,031 prompts and is continued in 7,373 ways; a conversation's own history is continued by its next
  turns, at most 11 ways in the published traces): sharing only such blocks says nothing of a session. Otherwise it
  opens a session.
- output: a request's output tokens are taken to be appended to its prompt in its session's next request, so the
  blocks its output completes carry that request's ids at those positions when the next request arrives later, is long
  enough to hold them and repeats this request's whole prompt; otherwise they get ids of their own (cached, never
  reused).
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

from kvsched.core.env import env_setting
from kvsched.sim.out_file import written_whole
from kvsched.sim.trace import TraceRequest, TraceWriter, computed_blocks
from kvsched.sim.trace_fields import bounded_lines, number_field

BLOCK_SIZE = 512  # tokens per hash id (Mooncake FAST'25 README)
MAX_OUTPUT_TOKENS = 2**24  # one request's output: far past any model's context (the published traces: < 2**12)
DEFAULT_MIN_SHARED = 0.75
COMMON_FANOUT = 32  # continuations past which a block is a prefix common to unrelated prompts (module docstring)
# Written into a converted file's meta; a cached conversion older than this is converted again (`current_conversion`).
# 1 (no version in the meta): sessions joined on a common system-prompt block and on a parent that arrived in the same
# timestamp, and output blocks took ids from such a "next turn" (found by review). 2: a request listed the block its
# last sampled token completes, whose KV vLLM never computes (found by review; `Trace.load` now refuses such lines).
CONVERTER_VERSION = 3
VERSION_META = "converter_version"


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


def common_prefix_ids(reqs: list[MooncakeRequest], fanout: int = COMMON_FANOUT) -> set[int]:
    """Ids the requests' prompts continue in more than `fanout` distinct ways (the next id, or the prompt's end):
    prefixes common to unrelated prompts, such as a system prompt. A count, not a share of the file: a long
    conversation in a short file is a large share of it, yet continued one way."""
    after: dict[int, set[int | None]] = {}
    for r in reqs:
        ids = r.hash_ids
        for k, h in enumerate(ids):
            nxt = after.setdefault(h, set())
            if len(nxt) <= fanout:
                nxt.add(ids[k + 1] if k + 1 < len(ids) else None)
    return {h for h, nxt in after.items() if len(nxt) > fanout}


def assign_sessions(reqs: list[MooncakeRequest], min_shared: float = DEFAULT_MIN_SHARED,
                    common: set[int] | None = None) -> list[int]:
    """Session index of every request (requests in arrival order); see the module docstring for the rule. `common`:
    the common prefix ids (default: `common_prefix_ids(reqs)`)."""
    if not 0.0 < min_shared <= 1.0:
        raise ValueError(f"min_shared must be in (0, 1], got {min_shared}")
    if any(b.t_ms < a.t_ms for a, b in zip(reqs, reqs[1:], strict=False)):
        raise ValueError("requests must be in arrival order")
    if common is None:
        common = common_prefix_ids(reqs)
    latest: dict[int, int] = {}  # block id -> latest earlier-instant request holding it (chained: one position)
    session: list[int] = []
    opened = 0
    instant = 0  # the first request of the current timestamp: those from it on cannot be parents yet
    for j, r in enumerate(reqs):
        if r.t_ms != reqs[instant].t_ms:
            for q in range(instant, j):
                for h in reqs[q].hash_ids:
                    latest[h] = q
            instant = j
        s = None
        for k in range(len(r.hash_ids) - 1, -1, -1):  # the longest prefix shared with any earlier request
            p = latest.get(r.hash_ids[k])
            if p is not None:
                if r.hash_ids[k] not in common and k + 1 >= min_shared * max(reqs[p].input_length // BLOCK_SIZE, 1):
                    s = session[p]
                break
        if s is None:
            s, opened = opened, opened + 1
        session.append(s)
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
        end = computed_blocks(r.input_length, r.output_length, BLOCK_SIZE)  # no KV for the last sampled token
        blocks: list[Any] = list(r.hash_ids[:nf])
        s = successor[j]
        if (s >= 0 and reqs[s].t_ms > r.t_ms and reqs[s].input_length >= r.input_length + r.output_length
                and reqs[s].hash_ids[:nf] == r.hash_ids[:nf]):
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
    common = common_prefix_ids(reqs)
    session = assign_sessions(reqs, min_shared, common)
    blocks = full_blocks(reqs, session)
    turns = [0] * (max(session, default=-1) + 1)
    for s in session:
        turns[s] += 1
    meta = {"source": f"mooncake:{source}", "importer": "kvsched trace import --format mooncake",
            VERSION_META: CONVERTER_VERSION, "min_shared": min_shared, "common_fanout": COMMON_FANOUT,
            "common_prefix_blocks": len(common), "requests": len(reqs), "sessions": len(turns),
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


def converted_version(path: Path) -> int:
    """The converter version a converted file's header names: 1 for one written before versions were, 0 for a file
    that cannot be read as a trace header."""
    try:
        with open(path) as f:
            meta = json.loads(f.readline(1 << 20)).get("meta") or {}
        version = meta.get(VERSION_META, 1)
    except (OSError, ValueError, AttributeError):
        return 0
    return version if type(version) is int else 0


def stale_note(meta: dict[str, Any]) -> str | None:
    """A warning for a trace whose header `meta` says an older converter imported it from Mooncake, else None."""
    if not str(meta.get("importer", "")).startswith("kvsched trace import --format mooncake"):
        return None
    version = meta.get(VERSION_META, 1)
    if type(version) is int and version >= CONVERTER_VERSION:
        return None
    return (f"converted by Mooncake converter version {version}, older than {CONVERTER_VERSION} "
            "(docs/trace_schema.md): "
            "convert it again (`kvsched trace import --format mooncake`, or `kvsched trace fetch mooncake`)")


def current_conversion(raw: Path, out: Path) -> dict[str, Any]:
    """Make `out` this converter's conversion of `raw`: converted again when missing or older (`converted_version`),
    else left as it is; returns its header's meta. A missing `raw` leaves `out` as it is (an error if it is missing)."""
    if (out.exists() and converted_version(out) >= CONVERTER_VERSION) or not raw.exists():
        with open(out) as f:
            header = json.loads(f.readline(1 << 20))
        meta = (header.get("meta") or {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict):  # found by review: an AttributeError (a traceback) for a header like `[1]`
            raise ValueError(f"{out}: its first line is not a trace header with a meta object, and {raw} is not "
                             "there to convert again (`kvsched trace fetch mooncake`)")
        return cast(dict[str, Any], meta)
    return convert_file(raw, out)


# ---- where the published traces live -------------------------------------------------------------------------------
MOONCAKE_COMMIT = "3b5a594133958449a1feaf1c9e0fc1b553e34a28"
MOONCAKE_URL = f"https://raw.githubusercontent.com/kvcache-ai/Mooncake/{MOONCAKE_COMMIT}/FAST25-release/traces"
# name -> (bytes, sha256) at MOONCAKE_COMMIT. `toolagent_trace.jsonl` is published but was not fetched (yet).
MOONCAKE_FILES = {
    "conversation_trace.jsonl": (3_029_533, "b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df"),
    "synthetic_trace.jsonl": (1_136_313, "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131"),
}


def traces_dir() -> Path:
    root = env_setting(os.environ, "KVSCHED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvsched")
    return Path(root) / "traces"


def cached_traces(names: Iterable[str] = tuple(MOONCAKE_FILES)) -> list[Path]:
    """The converted traces beside the fetched files `names` in the cache (`kvsched trace fetch mooncake`), each
    converted again first if this converter is newer than the one that wrote it."""
    directory = traces_dir() / "mooncake"
    out = []
    for name in names:
        path = directory / name.replace("_trace.jsonl", ".kvsched.jsonl")
        if path.exists() or (directory / name).exists():
            current_conversion(directory / name, path)
        out.append(path)
    return out
