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
images' hashes, can show a continuation).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import NamedTuple

TAIL_SLACK = 8


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


def tail_of(tokens: Sequence[int], start: int, opaque_end: int = 0) -> Tail:
    """The tail of a prompt `tokens` past position `start`; `opaque_end`: the end of its last position that cannot be
    compared (`OPAQUE` when that is past `start`)."""
    count = max(len(tokens) - start, 0)
    if count and opaque_end > start:
        return OPAQUE
    k = max(count - TAIL_SLACK, 0)
    return Tail(count, _digest(tokens, start, start + k) if k else 0, tuple(tokens[start + k:start + count]))


def repeats(tokens: Sequence[int], start: int, tail: Tail, opaque_end: int = 0) -> bool:
    """`tokens` (a later prompt, comparable up to `opaque_end`) continue past `start` a prompt whose tail was `tail`:
    the digested part repeated, then the kept tokens all repeated, or repeated up to one that differs (at least one
    token of the tail repeated) with the prompt ending with the rest of them. The cost is one slice digest and at most
    2 x TAIL_SLACK token comparisons."""
    count, kept, slack = tail
    if count <= 0:
        return count == 0
    if opaque_end > start:
        return False
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
    return k + m > 0 and n > start + count and tuple(tokens[n - len(rest):]) == rest
