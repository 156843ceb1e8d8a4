"""`kvsched trace`: bring public production traces into the kvsched trace schema, and describe any trace.

`kvsched trace fetch mooncake` downloads Mooncake's FAST'25 traces (kvcache-ai/Mooncake, Apache-2.0; 1-3 MB each) at a
pinned commit into `$KVSCHED_CACHE_DIR/traces/mooncake` (default `~/.cache/kvsched`), checks their SHA-256, and
converts each to `<name>.kvsched.jsonl` beside it (again whenever the converter is newer than the one that wrote it:
the header's `meta.converter_version`; so do the commands that read them by default). They stay out of the
repository: tests use small committed slices.
`kvsched trace import --format mooncake IN OUT` converts one file (assumptions: docs/trace_schema.md). `kvsched trace
stats FILE` describes a trace (an engine's recording, an imported or a generated one) before any replay."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import sys
import urllib.request
from pathlib import Path
from typing import Any

from kvsched.sim.mooncake import MOONCAKE_FILES, MOONCAKE_URL, traces_dir

FORMATS = ("mooncake",)


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser("trace", help="import public traces to the trace schema; describe a trace",
                                                       description=__doc__)
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION")
    sub.required = True
    imp = sub.add_parser("import", help="convert a public trace file to the kvsched trace schema")
    imp.add_argument("--format", choices=FORMATS, required=True)
    imp.add_argument("input", type=Path)
    imp.add_argument("output", type=Path)
    imp.add_argument("--min-shared", type=float, default=None,
                     help="mooncake: share of an earlier request's blocks a request must repeat to continue its "
                          "session (default 0.75)")
    imp.add_argument("--limit", type=int, default=None, help="convert only the first N requests (by arrival)")
    imp.set_defaults(func=run_import)
    fetch = sub.add_parser("fetch", help="download and convert a public trace set into the cache directory")
    fetch.add_argument("source", choices=FORMATS)
    fetch.add_argument("--dir", type=Path, default=None, help="default: $KVSCHED_CACHE_DIR/traces/<source>")
    fetch.add_argument("--base-url", default=MOONCAKE_URL, help="where the files are (a mirror, or file:// URL)")
    fetch.set_defaults(func=run_fetch)
    stats = sub.add_parser("stats", help="sessions, turns, idle gaps, repeated prompt share and KV of a trace file")
    stats.add_argument("trace", type=Path, help="a trace in the kvsched schema (recorded, imported or generated)")
    stats.add_argument("--ttl", type=float, action="append", default=None,
                       help="report the share of gaps within this many seconds (repeatable; default 30, 120, 600)")
    stats.add_argument("--json", action="store_true", help="print the figures as JSON")
    stats.set_defaults(func=run_stats)


def run_import(args: argparse.Namespace) -> int:
    from kvsched.sim.mooncake import DEFAULT_MIN_SHARED, convert_file

    try:
        if args.limit is not None and args.limit <= 0:
            raise ValueError("--limit must be positive")
        min_shared = DEFAULT_MIN_SHARED if args.min_shared is None else args.min_shared
        if not 0.0 < min_shared <= 1.0:  # checked before reading: 0 would link every request sharing one block
            raise ValueError(f"--min-shared must be in (0, 1], got {min_shared}")
        meta = convert_file(args.input, args.output, min_shared, args.limit)
    except (ValueError, OSError) as exc:
        print(f"kvsched trace import: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.output}: {meta['requests']} requests, {meta['sessions']} sessions "
          f"({meta['single_turn_sessions']} single-turn)")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    import json

    from kvsched.sim.trace import Trace
    from kvsched.sim.trace_stats import DEFAULT_TTLS, describe, trace_stats

    try:
        if args.ttl is not None and any(not 0 <= t < float("inf") for t in args.ttl):
            raise ValueError("--ttl takes seconds >= 0")
        stats = trace_stats(Trace.load(args.trace), tuple(args.ttl) if args.ttl else DEFAULT_TTLS)
    except (ValueError, OSError) as exc:
        print(f"kvsched trace stats: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(stats, indent=1) if args.json else f"{args.trace}:\n{describe(stats)}")
    return 0


def fetch_file(url: str, dest: Path, size: int, sha256: str) -> bool:
    """Download `url` to `dest` unless a file with the expected digest is there (False); a wrong digest is an error."""
    if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha256:
        return False
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:  # noqa: S310 - fixed https/file
            f.write(resp.read(size + 1))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if digest != sha256:
            raise ValueError(f"{url}: SHA-256 {digest}, expected {sha256} (the file changed upstream?)")
        tmp.replace(dest)
        return True
    except http.client.HTTPException as exc:  # a malformed URL or reply (found by review: a traceback)
        raise ValueError(f"{url}: {type(exc).__name__}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)  # a failed download leaves no partial file


def run_fetch(args: argparse.Namespace) -> int:
    from kvsched.sim.mooncake import convert_file, current_conversion

    directory = args.dir or traces_dir() / args.source
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, (size, sha) in MOONCAKE_FILES.items():
            raw = directory / name
            fetched = fetch_file(f"{args.base_url.rstrip('/')}/{name}", raw, size, sha)
            out = directory / name.replace("_trace.jsonl", ".kvsched.jsonl")
            # a file downloaded now is converted now (found by review: a conversion of the file it replaced, one of
            # another digest, was kept); else again only if an older converter wrote it
            meta = convert_file(raw, out) if fetched else current_conversion(raw, out)
            print(f"{out}: {meta['requests']} requests, {meta['sessions']} sessions "
                  f"({meta['single_turn_sessions']} single-turn)")
    except (ValueError, OSError) as exc:
        print(f"kvsched trace fetch: error: {exc}", file=sys.stderr)
        return 2
    return 0
