"""The fields of a trace's header and lines (docs/trace_schema.md), checked one by one: a trace is input from outside
(an engine's recording, an import, a hand-written file), and replay sizes pools and orders time by its numbers, so a
wrong type or an absurd value is a ValueError naming the field, never coerced. (The header's checks moved here from
`kvsched.sim.trace`, which re-exports them, to keep that file under the 400-line limit.)"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

FORMAT_VERSION = 1
CAPACITY_META = "capacity_blocks"  # header meta of an engine's recording: its KV pool, in the trace's blocks
BYTES_META = "kv_bytes_per_token"  # ... its KV bytes per token (all layers, the cache's dtype)
TIER_BLOCK_META = "fp8_tier_block_bytes"  # ... what one of the trace's blocks takes in kvsched's FP8 tier on it
MAX_COUNT = 2**40  # tokens or blocks in one request or block: far past any context, exact in int64 and float64
MAX_LINE_CHARS = 64 * 2**20  # one request's line: ~1,000x the longest real one (a 1M-token prompt's ids: ~20 KB)
_REQUIRED: Any = object()


def bounded_lines(f: TextIO, source: str, start: int = 1) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text stream, each at most MAX_LINE_CHARS: a file with no line ends (/dev/zero, a
    binary file, one huge JSON document) is a ValueError naming it, not a read that takes all memory (found by review)."""
    lineno = start
    while True:
        try:
            line = f.readline(MAX_LINE_CHARS)
        except UnicodeDecodeError as exc:  # name the file and line, not only the byte (found by review)
            raise ValueError(f"{source}:{lineno}: not UTF-8 text, at this line or one of the next few (decoded a "
                             f"block at a time: {exc.reason})") from None
        if not line:
            return
        if len(line) >= MAX_LINE_CHARS and not line.endswith("\n"):
            raise ValueError(f"{source}:{lineno}: a line longer than {MAX_LINE_CHARS:,} characters: not a trace "
                             "of one JSON object per line")
        yield lineno, line
        lineno += 1


def number_field(d: dict[str, Any], name: str, default: Any = _REQUIRED, integer: bool = False) -> Any:
    """Field `name` as a finite number >= 0 (counts: an int up to MAX_COUNT), `default` when absent or null. Replay
    sizes pools and orders time by these, so NaN, inf, negatives, bools and strings are errors, not coerced."""
    v = d.get(name)
    if v is None:
        if default is _REQUIRED:
            raise KeyError(name)
        return default
    if integer:
        if type(v) is not int or not 0 <= v <= MAX_COUNT:
            raise ValueError(f"{name} must be an integer in 0..{MAX_COUNT}, got {v!r}")
        return v
    if type(v) not in (int, float) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def text_field(d: dict[str, Any], name: str, optional: bool = True) -> Any:
    """Field `name` as a string (None when optional and absent or null)."""
    v = d.get(name)
    if v is None and optional:
        return None
    if v is None and name not in d:
        raise KeyError(name)
    if not isinstance(v, str):
        raise ValueError(f"{name} must be a string{' or null' if optional else ''}, got {v!r:.80}")
    return v


def flag_field(d: dict[str, Any], name: str) -> bool:
    """Field `name` as a JSON boolean (false when absent or null)."""
    v = d.get(name)
    if v is not None and not isinstance(v, bool):
        raise ValueError(f"{name} must be true or false, got {v!r:.80}")
    return bool(v)


def read_header(first: str, path: Path) -> dict[str, Any]:
    """The header line, checked: `block_size` divides every token count and `meta` feeds the replay's defaults."""
    try:
        header = json.loads(first) if first.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"{path}:1: {exc}") from None
    if not isinstance(header, dict) or header.get("kvsched_trace") != FORMAT_VERSION or "block_size" not in header:
        raise ValueError(f"{path}: first line must be a header {{\"kvsched_trace\": 1, \"block_size\": N, ...}}")
    bs = header["block_size"]
    if type(bs) is not int or not 1 <= bs <= MAX_COUNT:
        raise ValueError(f"{path}:1: block_size must be an integer in 1..{MAX_COUNT}, got {bs!r:.80}")
    if header.setdefault("meta", {}) is None:
        header["meta"] = {}
    if not isinstance(header["meta"], dict):
        raise ValueError(f"{path}:1: meta must be a JSON object, got {header['meta']!r:.80}")
    meta = header["meta"]
    # what a recording's replay sizes its pool and byte figures by: a bool, a negative, NaN or inf there was a pool
    # of one block or a traceback (found by review)
    if meta.get(CAPACITY_META) is not None and not (type(meta[CAPACITY_META]) is int
                                                    and 1 <= meta[CAPACITY_META] <= MAX_COUNT):
        raise ValueError(f"{path}:1: meta.{CAPACITY_META} must be an integer in 1..{MAX_COUNT}, "
                         f"got {meta[CAPACITY_META]!r:.80}")
    for name in (BYTES_META, TIER_BLOCK_META):
        v = meta.get(name)
        if v is not None and not (type(v) in (int, float) and math.isfinite(v) and 1 <= round(v) <= MAX_COUNT):
            raise ValueError(f"{path}:1: meta.{name} must be a finite number of bytes >= 1, got {v!r:.80}")
    return header


def optional_column(values: list[Any], dtype: Any) -> Any:
    """A trace's column of an optional field (a numpy array of `dtype`): None when no request has it; a request
    without it as NaN (times), -1 (counts) or False (flags)."""
    import numpy as np

    if not any(v is not None and v is not False for v in values):
        return None
    missing = {np.float64: np.nan, np.int64: -1}.get(dtype, False)
    return np.array([missing if v is None else v for v in values], dtype=dtype)
