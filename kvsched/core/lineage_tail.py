"""What a later prompt must repeat of an earlier one past the earlier prompt's last full block, which no block hash
covers (`kvsched.core.lineage` compares the hashes of the full blocks).

A continuation repeats the earlier prompt's tail, but a template may render its last few tokens differently once the
answer follows (Qwen3's empty think block; a raw prompt's trailing space merges into the answer's first token) and
then ends the new prompt with them again (the next generation prompt, the next trailing space). So the tail is kept as
a digest of all but its last `TAIL_SLACK` tokens, and those last ones as sent, and a prompt repeats it when it repeats
the digested part and either every kept token or, past the first token that differs, ends with the rest of them.

Found by review: comparing only the first 8 tokens of the tail let every user pass when the shared system prompt did
not end on a block boundary (those tokens were still system prompt), so unrelated users chained into one session.
Now the user's own words are compared wherever they sit in the tail; a prompt that repeats nothing past the last full
block (an empty digested part and a differing first token) does not continue it.

Positions whose token id does not say what they hold (multimodal placeholders: the same ids whatever the image;
prompt embeddings) cannot be compared: a tail holding one is never repeated (only the block hashes, which include the
images' hashes, can show a continuation). Only the positions compared count: a new image further on in the later
prompt (a follow-up turn attaching one) does not stop it continuing (found by review: it did, every such turn split
its session).
"""

from __future__ import annotations

from array import array
from collections.abc import Hashable, Sequence
from typing import NamedTuple

TAIL_SLACK = 8

Opaque = tuple[tuple[int, int], ...]  # a prompt's (start, end) ranges of positions that cannot be compared by token


def overlaps(opaque: Opaque, lo: int, hi: int) -> bool:
    """Some position in [lo, hi) cannot be compared (one pass over the prompt's few multimodal items)."""
    return any(a < hi and b > lo for a, b in opaque)


class Tail(NamedTuple):
    """A prompt's tokens past its last full block: `length` of them, a digest of the first `length - len(slack)`
    (0 for none) and the last `slack` as sent. `length` -1: not comparable (`OPAQUE`)."""

    length: int
    kept: int
    slack: tuple[int, ...]


OPAQUE = Tail(-1, 0, ())


def _digest(tokens: Sequence[int], start: int, stop: int) -> int:
    """A keyed 64-bit digest of `tokens[start:stop]` (SipHash of their bytes: a slice, not a Python loop)."""
    return hash(array("q", tokens[start:stop]).tobytes())


def tail_of(tokens: Sequence[int], start: int, opaque: Opaque = ()) -> Tail:
    """The tail of a prompt `tokens` past position `start`; `opaque`: its positions that cannot be compared
    (`OPAQUE` when the tail holds one)."""
    count = max(len(tokens) - start, 0)
    if count and opaque and overlaps(opaque, start, start + count):  # (a text prompt has none: no call)
        return OPAQUE
    k = max(count - TAIL_SLACK, 0)
    return Tail(count, _digest(tokens, start, start + k) if k else 0, tuple(tokens[start + k:start + count]))


def repeats(tokens: Sequence[int], start: int, tail: Tail, opaque: Opaque = (), named: bool = False) -> bool:
    """`tokens` (a later prompt whose positions in `opaque` cannot be compared) continue past `start` a prompt whose
    tail was `tail`: the digested part repeated, then the kept tokens all repeated, or repeated up to one that
    differs (at least one token of the tail repeated) with the prompt ending with the rest of them. The cost is one
    slice digest and at most 2 x TAIL_SLACK token comparisons.

    `named`: the client named the session, so what cannot be compared does not refuse it (an opaque tail, an image
    among the compared positions, prompt embeddings), and a tail re-rendered whole (Qwen3's empty think block alone
    past the last full block; a one-token trailing space merged into the answer) continues it when the prompt ends
    with it again. Found by review of the lineage fixes: each of those split a named session's own continuation into
    a new branch. A stranger's different words under the id still start a branch of their own."""
    count, kept, slack = tail
    if count <= 0:
        return count == 0 or named
    if opaque and overlaps(opaque, start, start + count):
        return named
    n = len(tokens)
    k = count - len(slack)
    if k and (n < start + k or _digest(tokens, start, start + k) != kept):
        return False
    pos = start + k
    m = 0
    for want in slack:
        if pos + m >= n or tokens[pos + m] != want:
            break
        m += 1
    if m == len(slack):
        return True
    rest = slack[m:]
    return ((named or k + m > 0) and n > start + count and not (opaque and overlaps(opaque, n - len(rest), n))
            and tuple(tokens[n - len(rest):]) == rest)


def repeats_last_prompt(anchor: tuple[int, Hashable] | None, tail: Tail | None, i: int, n: int,
                        tokens: Sequence[int] | None, block: int) -> bool:
    """A prompt of `n` full blocks that continues a session at block `i` repeats its last prompt (whose last full
    block is `anchor`, with `tail` past it), adding nothing past it: at that anchor, no full block further and (tokens
    known) no more tokens than that prompt had. (A computed anchor, which repeats the answer, always lies past it.)"""
    if anchor is None or anchor[0] != i or i != n - 1:
        return False
    return tokens is None or not block or tail is None or len(tokens) <= (i + 1) * block + max(tail.length, 0)
