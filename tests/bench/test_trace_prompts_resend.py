"""`kvsched bench replay`'s later turns resend the last prompt as a client does: its partial last block, token for
token, where the trace's next turn lists another id there (the block the output completed). Found at stop 53: the
replay began that block with the new id's tokens, so kvsched's named-tail lineage check read most later turns of the
Mooncake traces as branches of their own and the engine's retained-hit credit read ~0 (`tools/replay_tails.py`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvsched.bench.trace_prompts import block_tokens_of, plan
from kvsched.sim import mooncake
from kvsched.sim.trace import Trace, TraceRequest
from tests.tools_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
SLICES = ROOT / "tests" / "sim" / "data"
BS = 512  # Mooncake's block size
K = 32
V = 2048


def req(t, session, blocks, prompt, output=BS, reuse=0, salt=None):
    return TraceRequest(t=t, session=session, prompt_tokens=prompt, output_tokens=output, blocks=blocks, reuse=reuse,
                        salt=salt)


def tokens(names, ids):
    """The tokens `block_tokens_of` gives these block names (`ids`: their dense ids, from `dense`)."""
    return block_tokens_of(np.array([ids[n] for n in names]), K, V)


def dense(requests):
    """Name -> dense id, as Trace.from_requests numbers names (unsalted ones)."""
    out: dict[str, int] = {}
    for r in requests:
        for b in r.blocks:
            out.setdefault(b, len(out))
    return out


def test_a_second_turn_starts_with_the_first_prompt_whole_then_its_own_block():
    # Mooncake's shape: the first turn's output completes block "out" (an id of its own); the next turn lists "x"
    # there (its block holds the output too) and goes on to "y"
    reqs = [req(0.0, "s1", ["a", "b", "out"], prompt=2 * BS + BS // 2, output=BS),
            req(5.0, "s1", ["a", "b", "x", "y"], prompt=3 * BS + BS // 4),
            req(9.0, "s1", ["a", "b", "x", "y", "z"], prompt=4 * BS + 10)]
    first, second, third = plan(Trace.from_requests(BS, reqs), K, V).requests
    assert len(first.prompt) == 2 * K + K // 2 and len(second.prompt) == 3 * K + K // 4
    assert second.prompt[:len(first.prompt)] == first.prompt  # failed before: block 2 began with x's tokens
    ids = dense(reqs)
    assert second.prompt[2 * K + K // 2:3 * K] == tokens(["x"], ids)[0, K // 2:].tolist()  # then x's own
    # the block stands for "x" from then on: the third turn resends the second whole, through x and y's start
    assert third.prompt[:len(second.prompt)] == second.prompt
    # lengths, times and output lengths are the trace's as before
    assert [r.blocks for r in (first, second, third)] == [2, 3, 4] and [r.at_s for r in (first, second, third)] == [
        0.0, 5.0, 9.0]


def test_a_turn_that_diverges_within_the_full_blocks_is_as_the_trace_lists_it():
    reqs = [req(0.0, "s1", ["a", "b", "out"], prompt=2 * BS + BS // 2, output=BS),
            req(5.0, "s1", ["a", "c", "d"], prompt=2 * BS + BS // 2)]  # an edit of block 1: shares fewer full blocks
    first, second = plan(Trace.from_requests(BS, reqs), K, V).requests
    ids = dense(reqs)
    assert second.prompt == tokens(["a", "c", "d"], ids).ravel()[:2 * K + K // 2].tolist()
    assert second.prompt[:K] == first.prompt[:K] and second.prompt[K:2 * K] != first.prompt[K:2 * K]


def test_a_turn_within_the_same_block_and_a_random_tail_are_resent_too():
    # the first output does not complete its block (no id past the full ones: a random tail); the next turn is longer
    # but still ends in that block (no id there either)
    reqs = [req(0.0, "s1", ["a", "b"], prompt=2 * BS + 100, output=10),
            req(5.0, "s1", ["a", "b"], prompt=2 * BS + 300, output=10)]
    first, second = plan(Trace.from_requests(BS, reqs), K, V).requests
    assert len(second.prompt) > len(first.prompt) and second.prompt[:len(first.prompt)] == first.prompt


def test_a_tail_of_zero_resends_nothing_past_the_full_blocks():
    reqs = [req(0.0, "s1", ["a", "b", "out"], prompt=2 * BS, output=BS + 1),  # ends on a block boundary
            req(5.0, "s1", ["a", "b", "x", "y"], prompt=3 * BS + BS // 2)]
    first, second = plan(Trace.from_requests(BS, reqs), K, V).requests
    assert len(first.prompt) == 2 * K
    assert second.prompt[2 * K:3 * K] == tokens(["x"], dense(reqs))[0].tolist()


def test_a_dropped_turn_is_not_resent_the_last_planned_one_is():
    reqs = [req(0.0, "s1", ["a", "b", "out"], prompt=2 * BS + BS // 2, output=BS),
            req(3.0, "s1", ["a", "b", "x"] + [f"l{i}" for i in range(200)], prompt=203 * BS),  # too long: dropped
            req(5.0, "s1", ["a", "b", "x", "y"], prompt=3 * BS + BS // 2)]
    p = plan(Trace.from_requests(BS, reqs), K, V, max_tokens_per_request=4096)
    assert p.kept.tolist() == [True, False, True]
    first, third = p.requests
    assert third.prompt[:len(first.prompt)] == first.prompt


def test_a_block_an_earlier_prompt_sent_keeps_its_tokens():
    # s2 sent block "x" whole before s1's next turn lists it: the trace says they share it, so s1's turn takes s2's
    # tokens there rather than its own last tail
    reqs = [req(0.0, "s1", ["a", "b", "out"], prompt=2 * BS + BS // 2, output=BS),
            req(1.0, "s2", ["a", "b", "x"], prompt=3 * BS),
            req(5.0, "s1", ["a", "b", "x", "y"], prompt=3 * BS + BS // 2)]
    first, other, second = plan(Trace.from_requests(BS, reqs), K, V).requests
    assert second.prompt[:3 * K] == other.prompt[:3 * K]
    assert second.prompt[2 * K:3 * K] == tokens(["x"], dense(reqs))[0].tolist()


def test_a_salted_session_resends_its_own_last_prompt_not_the_other_salts():
    reqs = [req(0.0, "u", ["a", "out1"], prompt=BS + BS // 2, output=BS, salt="A"),
            req(1.0, "u", ["a", "out2"], prompt=BS + BS // 4, output=BS, salt="B"),
            req(5.0, "u", ["a", "x", "y"], prompt=2 * BS + BS // 2, salt="A")]
    a1, b1, a2 = plan(Trace.from_requests(BS, reqs), K, V).requests
    assert (a1.session, b1.session, a2.session) == ("u@A", "u@B", "u@A")
    assert a2.prompt[:len(a1.prompt)] == a1.prompt
    assert a2.prompt[:K] != b1.prompt[:K]  # another salt's "a" is another block


def load_tails_tool():
    return load_tool("replay_tails")


def test_no_later_turn_of_the_mooncake_slices_repeats_only_the_full_blocks(tmp_path):
    """Before: the conversation slice had 14 such turns of 31, the synthetic one 29 of 42 (`tools/replay_tails.py`)."""
    tool = load_tails_tool()
    for name in ("conversation", "synthetic"):
        out = tmp_path / f"{name}.jsonl"
        mooncake.convert_file(SLICES / f"mooncake_{name}_slice.jsonl", out)
        turns, _, _ = tool.count(plan(Trace.load(out), K, V).requests)
        assert turns["tail"] == 0, (name, turns)
        assert turns["whole"] >= 20, (name, turns)  # the check ran over real later turns
