"""Cut the small Mooncake slices under tests/sim/data/ (raw Mooncake lines, Apache-2.0, see the NOTICE there).

    python tools/mooncake_slice.py ~/.cache/kvsched/traces/mooncake/conversation_trace.jsonl OUT --multi 10 --single 20

Keeps every request of the first `--multi` sessions with at least 3 turns and of the first `--single` single-turn
sessions (sessions as `kvsched trace import` recovers them), in the file's order."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from kvsched.sim.mooncake import assign_sessions, parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--multi", type=int, default=10)
    ap.add_argument("--single", type=int, default=20)
    args = ap.parse_args()
    lines = [ln for ln in args.input.read_text().splitlines() if ln.strip()]
    session = assign_sessions(list(parse(lines, args.input.name)))
    turns = Counter(session)
    multi = [s for s in dict.fromkeys(session) if turns[s] >= 3][: args.multi]
    single = [s for s in dict.fromkeys(session) if turns[s] == 1][: args.single]
    keep = set(multi) | set(single)
    args.output.write_text("".join(ln + "\n" for ln, s in zip(lines, session, strict=True) if s in keep))


if __name__ == "__main__":
    main()
