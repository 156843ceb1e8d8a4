"""How `kvsched bench replay`'s prompts continue their session's last turn, token by token, as the engine's lineage
sees them (`kvsched.core.lineage`: since 7147c6e a named session's turn joins its branch only if it repeats the last
prompt's tokens past its last full block too; otherwise it starts a branch of its own).

    python tools/replay_tails.py [TRACE] [SECONDS]     (default: the cached Mooncake conversation trace, 600 s)

Per later turn of a session: `whole` repeats the last prompt whole (one branch); `tail` repeats its full blocks but
not its partial last block's tokens (a branch of its own since 7147c6e, one branch before); `diverges` differs within
the full blocks (a branch of its own either way). With the turns that arrive within 30 s of the last (a pin at the
default TTL may still be there) and the full blocks of the last prompt they could have hit.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from kvsched.bench.trace_engine import BLOCK_TOKENS
from kvsched.bench.trace_prompts import ReplayRequest, plan, window
from kvsched.sim.trace import Trace
from kvsched.tiny_model import SIZES

QUICK_S = 30.0  # the default TTL (RetentionConfig.default_ttl_s)


CONVERSATION = Path.home() / ".cache/kvsched/traces/mooncake/conversation.kvsched.jsonl"


def kind(prev: ReplayRequest, new: ReplayRequest) -> str:
    """How `new` continues `prev` (see the module docstring)."""
    if new.prompt[:len(prev.prompt)] == prev.prompt:
        return "whole"
    full = prev.blocks * BLOCK_TOKENS
    return "tail" if len(new.prompt) > full and new.prompt[:full] == prev.prompt[:full] else "diverges"


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv and argv[0] else CONVERSATION
    seconds = float(argv[1]) if len(argv) > 1 else 600.0
    p = plan(window(Trace.load(path), 0.0, seconds), BLOCK_TOKENS, SIZES["test"].vocab_size)
    last: dict[str, ReplayRequest] = {}
    turns, quick, quick_blocks = Counter[str](), Counter[str](), Counter[str]()
    for r in p.requests:
        prev = last.get(r.session)
        last[r.session] = r
        if prev is None:
            turns["first"] += 1
            continue
        k = kind(prev, r)
        turns[k] += 1
        if r.at_s - prev.at_s < QUICK_S:
            quick[k] += 1
            quick_blocks[k] += prev.blocks
    print(f"{path.name}, first {seconds:g} s: {len(p.requests)} requests, {turns['first']} first turns")
    for k in ("whole", "tail", "diverges"):
        print(f"  {k}: {turns[k]} later turns; within {QUICK_S:g} s of the last: {quick[k]} "
              f"(the last prompts' full blocks: {quick_blocks[k]})")


if __name__ == "__main__":
    main(sys.argv[1:])
