"""Token prompts for a trace file, so a real engine can serve it: one engine block per trace block.

A trace (docs/trace_schema.md; Mooncake's imported ones: 512 tokens a block) names each request's full blocks by
chained ids. Every id becomes `block_tokens` token ids drawn from the id alone (a hash), so two requests share a prefix
in vLLM's cache exactly when they share ids in the trace; with the engine's `--block-size` equal to `block_tokens`,
each trace block is one engine block and the pool is sized in the trace's own blocks. Lengths scale by
`block_tokens / trace block size` (Mooncake at 32: 1/16, a 12k-token prompt becomes ~750 tokens).

What the engine cannot replay: a request's output is the model's (here random weights), not the tokens the next turn
repeats, so the block a turn's output completes is cached under other content and its next turn computes it again, on
every side alike (the simulator counts it a hit). A prompt's partial last block is the start of the block the trace
lists at that position (random tokens where it lists none); its length is rounded up (1..block_tokens-1 tokens), so a
prompt that does not end on a trace block boundary does not end on an engine block boundary either.

A later turn resends its session's last prompt as a client does: when it repeats all of the last (planned) prompt's
full blocks and goes on past them, it continues there with that prompt's partial last block, token for token, and then
with its own block's tokens (the trace's id there is usually another one: the block holds the output too). Such a
block's tokens then stand for its id wherever it appears later; an id some earlier prompt already sent keeps its
tokens (the trace says the two share it). Before this (up to 5a985be) the later turn began that block with its own
id's tokens, so kvsched's named-tail lineage check (`kvsched.core.lineage_tail`) read most later turns as branches
(`tools/replay_tails.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvsched.sim.trace import Trace

FIRST_TOKEN = 10  # ids below are left to the tokenizer's special tokens
_MIX = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """One request of the replay: when it is sent (seconds after the first), its session and its prompt."""

    at_s: float
    session: str
    prompt: list[int]
    max_tokens: int
    blocks: int  # full prompt blocks (engine blocks)


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    requests: list[ReplayRequest]
    block_tokens: int
    trace_block_size: int
    peak_live_blocks: int  # of the kept requests, in trace (= engine) blocks
    kept: np.ndarray  # bool over the trace's requests: those in `requests` (the rest: longer than the replay's limit)

    @property
    def dropped_long(self) -> int:
        return int(len(self.kept) - self.kept.sum())

    @property
    def longest_tokens(self) -> int:
        return max((len(r.prompt) + r.max_tokens for r in self.requests), default=0)


def block_tokens_of(ids: np.ndarray, block_tokens: int, vocab_size: int) -> np.ndarray:
    """(len(ids), block_tokens) token ids, a function of each id alone (splitmix64 of id x block_tokens + j)."""
    span = vocab_size - 2 * FIRST_TOKEN
    if span <= 0:
        raise ValueError(f"vocab_size {vocab_size} leaves no tokens above the special ones")
    with np.errstate(over="ignore"):
        x = ids.astype(np.uint64)[:, None] * np.uint64(block_tokens) + np.arange(block_tokens, dtype=np.uint64)
        x = (x + np.uint64(1)) * _MIX
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(span)).astype(np.int64) + FIRST_TOKEN


def window(trace: Trace, start_s: float, seconds: float) -> Trace:
    """The requests arriving in [first arrival + start_s, + seconds)."""
    if not (seconds > 0 and start_s >= 0):
        raise ValueError(f"the window needs seconds > 0 and a start >= 0, got {seconds} from {start_s}")
    t0 = float(trace.t[0]) if len(trace) else 0.0
    keep = (trace.t >= t0 + start_s) & (trace.t < t0 + start_s + seconds)
    if not keep.any():
        raise ValueError(f"no request arrives in the {seconds:g} s from {start_s:g} s")
    return trace.subset(keep)


def plan(trace: Trace, block_tokens: int, vocab_size: int, max_output_tokens: int = 64,
         max_tokens_per_request: int = 8192, time_scale: float = 1.0, seed: int = 0) -> ReplayPlan:
    """The trace's requests as token prompts (see the module docstring), sent at `time_scale` x their gaps."""
    if block_tokens < 1 or max_output_tokens < 1 or not 0 < time_scale < math.inf:
        raise ValueError("block_tokens and max_output_tokens must be >= 1 and time_scale finite and > 0")
    bs = trace.block_size
    rng = np.random.default_rng(seed)
    t0 = float(trace.t[0]) if len(trace) else 0.0
    out: list[ReplayRequest] = []
    keep = np.ones(len(trace), dtype=bool)
    blocks = _Blocks(block_tokens, vocab_size)
    last: dict[int, tuple[np.ndarray, int, np.ndarray]] = {}  # session -> its last planned (ids, full, prompt)
    for i in range(len(trace)):
        ids = trace.blocks(i)
        prompt = int(trace.prompt_tokens[i])
        full = min(prompt // bs, len(ids))
        left = prompt - full * bs
        # A partial last block stays partial (rounded up, never to a whole block): rounded down to nothing, the prompt
        # would end on a block boundary and vLLM could not hit its last block (it computes the last token).
        tail = min(-(-left * block_tokens // bs), block_tokens - 1) if 0 < left < bs else left * block_tokens // bs
        new = max(1, min(max_output_tokens, -(-int(trace.output_tokens[i]) * block_tokens // bs)))
        if full * block_tokens + max(tail, 1) + new > max_tokens_per_request:
            keep[i] = False
            continue
        sent = ids[:full + 1] if len(ids) > full and tail else ids[:full]  # the ids whose tokens the prompt holds
        rows = blocks.rows(sent)
        extra = np.zeros(0, dtype=np.int64)  # tokens past the listed blocks
        if len(ids) <= full:
            extra = rng.integers(FIRST_TOKEN, vocab_size - FIRST_TOKEN, size=tail)
        if full == 0 and tail == 0:  # a prompt shorter than one scaled token: one token of its own
            extra = rng.integers(FIRST_TOKEN, vocab_size - FIRST_TOKEN, size=1)
        n = full * block_tokens + (tail if len(sent) > full else len(extra))
        index = int(trace.session[i])  # (id, salt): one id with two salts is two sessions in the trace
        if index in last:
            _resend(last[index], ids, sent, rows, extra, n, blocks)
        blocks.sent(sent)
        tokens = np.concatenate([rows.ravel()[:min(n, len(sent) * block_tokens)], extra])
        last[index] = (ids, full, tokens)
        sid, salt = trace.sessions[index]
        session = sid if salt is None else f"{sid}@{salt}"
        out.append(ReplayRequest(at_s=(float(trace.t[i]) - t0) * time_scale, session=session,
                                 prompt=[int(x) for x in tokens], max_tokens=new, blocks=full))
    live = trace.subset(keep).peak_live_blocks() if keep.any() else 0
    return ReplayPlan(out, block_tokens, bs, live, keep)


class _Blocks:
    """Each id's `block_tokens` tokens: `block_tokens_of` unless a resent tail made them (`_resend`); fixed once a
    prompt has sent them."""

    def __init__(self, block_tokens: int, vocab_size: int) -> None:
        self.block_tokens, self.vocab_size = block_tokens, vocab_size
        self.made: dict[int, np.ndarray] = {}  # the blocks a resent tail began
        self.fixed: set[int] = set()  # ids a prompt has sent

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), block_tokens), a copy the caller may change."""
        rows = block_tokens_of(ids, self.block_tokens, self.vocab_size)
        for j, b in enumerate(ids.tolist()):
            if b in self.made:
                rows[j] = self.made[b]
        return rows

    def sent(self, ids: np.ndarray) -> None:
        """A prompt sent these blocks (a partial last one too): their tokens stay as they are now."""
        self.fixed.update(ids.tolist())


def _resend(previous: tuple[np.ndarray, int, np.ndarray], ids: np.ndarray, sent: np.ndarray, rows: np.ndarray,
            extra: np.ndarray, n: int, blocks: _Blocks) -> None:
    """A later turn of `previous`'s session (its ids, full blocks, prompt) that repeats all of its full blocks and
    goes on past them repeats its partial last block there, as a client resends the last prompt: in `rows` (the
    turn's blocks `sent`, changed in place) and `extra` (its tokens past them), up to its own length `n`. Stops at a
    block whose id an earlier prompt sent (its tokens are that prompt's)."""
    p_ids, p_full, p_tokens = previous
    k = blocks.block_tokens
    start, stop = p_full * k, min(len(p_tokens), n)
    if stop <= start or len(ids) < p_full or not np.array_equal(ids[:p_full], p_ids[:p_full]):
        return  # nothing past the full blocks, or a turn that diverges within them: as the trace lists it
    for j in range(p_full, -(-stop // k)):
        lo, hi = j * k, min(stop, (j + 1) * k)
        if j < len(sent):
            if int(sent[j]) in blocks.fixed:
                return
            rows[j, :hi - lo] = p_tokens[lo:hi]
            blocks.made[int(sent[j])] = rows[j].copy()
        else:
            base = len(sent) * k
            extra[lo - base:hi - base] = p_tokens[lo:hi]
