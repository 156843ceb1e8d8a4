"""How `kvsched bench replay`'s prompts continue their session's last turn, token by token, as the engine's lineage
sees them (`kvsched.core.lineage`: since 7147c6e a named session's turn joins its branch only if it repeats the last
prompt's tokens past its last full block too; otherwise it starts a branch of its own).

    python tools/replay_tails.py [TRACE] [SECONDS]     (default: the cached Mooncake conversation trace, 600 s)

Per later turn of a session: `whole` repeats the last prompt whole (one branch); `shorter` is shorter than the last
prompt and repeats it as far as it goes past its full blocks (an edited last message: a branch of its own); `tail`
repeats its full blocks but not its partial last block's tokens (a branch of its own since 7147c6e, one branch
before); `diverges` differs within the full blocks (a branch of its own either way). With the turns that arrive within
30 s of the last (a pin at the default TTL may still be there) and the full blocks of the last prompt they could have
hit. Since the replay resends the last prompt's partial block (after 5a985be), `tail` is 0 on Mooncake's traces;
before, it was most later turns (the conversation trace's first 600 s: 165 of 420).
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
    if len(new.prompt) <= full or new.prompt[:full] != prev.prompt[:full]:
        return "diverges"
    return "shorter" if prev.prompt[:len(new.prompt)] == new.prompt else "tail"


KINDS = ("whole", "shorter", "tail", "diverges")


def count(requests: list[ReplayRequest]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Later turns by kind (and "first": first turns); those within QUICK_S of the last; their last prompts' blocks."""
    last: dict[str, ReplayRequest] = {}
    turns, quick, quick_blocks = Counter[str](), Counter[str](), Counter[str]()
    for r in requests:
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
    return turns, quick, quick_blocks


def main(argv: list[str]) -> None:
    path = Path(argv[0]) if argv and argv[0] else CONVERSATION
    seconds = float(argv[1]) if len(argv) > 1 else 600.0
    p = plan(window(Trace.load(path), 0.0, seconds), BLOCK_TOKENS, SIZES["test"].vocab_size)
    turns, quick, quick_blocks = count(p.requests)
    print(f"{path.name}, first {seconds:g} s: {len(p.requests)} requests, {turns['first']} first turns")
    for k in KINDS:
        print(f"  {k}: {turns[k]} later turns; within {QUICK_S:g} s of the last: {quick[k]} "
              f"(the last prompts' full blocks: {quick_blocks[k]})")


if __name__ == "__main__":
    main(sys.argv[1:])
