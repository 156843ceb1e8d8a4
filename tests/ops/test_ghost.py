"""The compiled ghost LRU (`kvsched._C.GhostLru`) against its reference (`kvsched.core.ghost_lru.LruGhost`): the same
counts after every call and the same books (keys in LRU order, held keys), on the simulator's ids and on vLLM-like
digests, at every sampling rate the tracker uses; and the replay decides the same with either."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from collections.abc import Hashable
from dataclasses import replace

import pytest

from kvsched.core.ghost_lru import MASK, MIX, LruGhost
from kvsched.core.pin_payback import Ghost
from kvsched.ops.ghost import check_ghost_setting, ghost_choice, new_ghost
from tests.ops.conftest import require_cxx


def digest(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "little")).digest()


def books(g: Ghost) -> tuple[list[int], dict[int, int]]:
    """The ghost's keys in LRU order and its held keys, as Python hashes (the compiled ghost's keys)."""
    keys, held = g.keys(), g.running()  # type: ignore[attr-defined]
    if isinstance(g, LruGhost):
        return [hash(k) for k in keys], {hash(k): n for k, n in held.items()}
    return keys, held


def drive(ghosts: list[Ghost], rng: random.Random, key, steps: int = 2500, caps: tuple[int, int] = (8, 160)) -> int:
    """Random requests sharing prefixes, started and finished out of order, with a pool that grows and shrinks;
    returns the ghosts' total prefix hits (the same on every side, or an assertion fails)."""
    running: list[list] = []
    hits = 0
    for step in range(steps):
        cap = rng.randrange(*caps)
        if running and (len(running) > 12 or rng.random() < 0.5):
            keys = running.pop(rng.randrange(len(running)))
            keys = keys + [key(10**6 + step * 8 + j) for j in range(rng.randrange(3))]  # its output's blocks
            for g in ghosts:
                g.cached(keys, cap)
        else:
            base, n = rng.randrange(caps[1] // 4) * 1000, rng.randrange(1, 50)
            keys = [key(base + i) for i in range(n)]
            if rng.random() < 0.1:
                keys[rng.randrange(n)] = keys[0]  # a repeated key within one prompt
            cached, hittable = rng.randrange(n + 1), rng.randrange(-1, n + 1)
            out = {tuple(g.observe(keys, cached, hittable, cap)) for g in ghosts}
            assert len(out) == 1, (step, out)
            hits += out.pop()[2]
            running.append(keys)
        assert len({(len(g), g.held()) for g in ghosts}) == 1, step
        if step % 50 == 0:
            first = books(ghosts[0])
            assert all(books(g) == first for g in ghosts[1:]), step
    return hits


@pytest.mark.parametrize("rate", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("kind", ["ids", "digests"])
def test_the_compiled_ghost_keeps_the_references_books(rate: int, kind: str) -> None:
    require_cxx()
    ghosts = [LruGhost(rate), new_ghost(rate, "cxx")]
    assert not isinstance(ghosts[1], LruGhost)
    hits = drive(ghosts, random.Random(rate * 7 + len(kind)), int if kind == "ids" else digest)
    assert hits > 0 and len(ghosts[0]) > 0


def test_the_compiled_ghosts_tables_grow_and_shrink_without_losing_a_key() -> None:
    """Thousands of keys in the ghost and its held set: the flat hash tables (csrc/include/kvsched/flat_map.h) grow
    several times and delete by backward shift, and the books still equal the reference's."""
    require_cxx()
    ghosts = [LruGhost(1), new_ghost(1, "cxx")]
    assert drive(ghosts, random.Random(5), int, steps=3000, caps=(2000, 6000)) > 0
    assert len(ghosts[0]) > 1000 and books(ghosts[0]) == books(ghosts[1])


def test_the_compiled_ghost_reads_any_sequence_and_refuses_what_it_cannot_hash() -> None:
    require_cxx()
    g = new_ghost(1, "cxx")
    assert tuple(g.observe((1, 2, 3), 0, -1, 10)) == (0, 3, 0, False)  # a tuple: read as a list
    g.cached(iter([1, 2, 3]), 10)  # an iterator too
    assert g.keys() == [3, 2, 1] and not g.held()  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="unhashable"):
        g.observe([1, [2]], 0, -1, 10)
    with pytest.raises(TypeError, match="sequence"):
        g.cached(5, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate"):
        new_ghost(0, "cxx")
    with pytest.raises(ValueError, match="rate"):
        LruGhost(0)


def test_digests_outside_a_uniform_list_are_sampled_by_the_same_rule_in_both() -> None:
    """Found by review: the reference sampled a tuple of digests, or a list of mixed widths, by their hashes, the
    compiled ghost by their first bytes. Now both go key by key, by the first byte."""
    require_cxx()
    keys = [digest(i) for i in range(400)]
    for shaped in (tuple(keys), keys[:200] + [b"short"] + keys[200:], keys[:100] + [12345] + keys[100:]):
        ref, cxx = LruGhost(8), new_ghost(8, "cxx")
        assert tuple(ref.observe(shaped, 50, -1, 500)) == tuple(cxx.observe(shaped, 50, -1, 500))  # type: ignore[arg-type]
        assert books(ref) == books(cxx) and ref.held() > 0
    assert sum(k[0] < 32 for k in keys) == LruGhost(8).observe(tuple(keys), 0, -1, 500)[1]  # type: ignore[arg-type]

    class Sub(bytes):  # found by the second review: the reference sampled a bytes subclass by its first byte
        pass

    sub = next(Sub(b) for i in range(256) if (hash(b := bytes([1, i]) * 16) * MIX) & MASK >= (1 << 62))
    mixed = [bytes(32), sub]  # its first byte is in the table, its hash is not sampled at 1 in 4
    ref, cxx = LruGhost(4), new_ghost(4, "cxx")
    assert tuple(ref.observe(mixed, 0, -1, 10)) == tuple(cxx.observe(mixed, 0, -1, 10))
    assert books(ref) == books(cxx)
    with pytest.raises(TypeError):
        LruGhost(4).observe([bytes(32), bytearray(32)], 0, -1, 10)  # unhashable, as in the compiled ghost
    # found by the third review: widths 2, 1, 3 sum to a multiple of the first, and the one-join slice sampled the
    # second key by the third's first byte
    for rate in (2, 8):
        ref, cxx = LruGhost(rate), new_ghost(rate, "cxx")
        uneven = [b"\0\0", b"\xff", b"\xff\0\0"]
        assert tuple(ref.observe(uneven, 3, -1, 100)) == tuple(cxx.observe(list(uneven), 3, -1, 100))
        assert books(ref) == books(cxx)


def test_a_remembered_list_grown_by_a_key_of_another_type_is_sampled_key_by_key() -> None:
    """Found by review: `cached` on a list `observe` had remembered (bytes keys), grown by an int, took the int's len()
    and raised TypeError. It now goes key by key, as a list never seen (a copy) does and as the compiled ghost does."""
    from kvsched.ops import backends

    seen, fresh = LruGhost(4), LruGhost(4)
    ghosts: list[Ghost] = [seen, fresh] + ([new_ghost(4, "cxx")] if backends.has_cxx() else [])
    keys: list[Hashable] = [b"\x00abc", b"\x01abd"]
    for g in ghosts:
        g.observe(keys if g is seen else list(keys), 0, -1, 10)
    keys.append(7)
    for g in ghosts:
        g.cached(keys if g is seen else list(keys), 10)
    assert all(books(g) == books(fresh) for g in ghosts) and len(fresh) >= 2 and not fresh.held()


def test_a_key_whose_hash_changes_the_list_does_not_crash_the_compiled_ghost() -> None:
    """Found by review: the compiled ghost read the caller's list in place while a key's Python __hash__ could free
    its items (a segfault). In a child process, so that a crash fails this test only."""
    require_cxx()
    code = (
        "from kvsched.ops.ghost import new_ghost\n"
        "class K:\n"
        "    def __init__(self, i, owner): self.i, self.owner = i, owner\n"
        "    def __hash__(self):\n"
        "        self.owner.clear()\n"
        "        return self.i\n"
        "    def __eq__(self, other): return isinstance(other, K) and other.i == self.i\n"
        "g = new_ghost(1, 'cxx')\n"
        "keys = []\n"
        "keys.extend(K(i, keys) for i in range(1000))\n"
        "print(tuple(g.observe(keys, 0, -1, 10)), g.held())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(0,", "1000,", "0,", "False)", "1000"]  # every key read, from a copy


def test_kvsched_ghost_cxx_is_refused_at_start_where_it_is_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvsched.ops import backends

    check_ghost_setting({"KVSCHED_GHOST": "auto"})
    monkeypatch.setattr(backends, "cxx", lambda: None)
    with pytest.raises(ValueError, match="KVSCHED_GHOST='cxx': kvsched._C has no GhostLru"):
        check_ghost_setting({"KVSCHED_GHOST": "cxx"})
    check_ghost_setting({"KVSCHED_GHOST": "python"})
    assert isinstance(new_ghost(8, "auto"), LruGhost)  # not built: the reference


def test_the_ghost_is_chosen_by_kvsched_ghost() -> None:
    assert ghost_choice({}) == "auto" and ghost_choice({"KVSCHED_GHOST": " Python "}) == "python"
    with pytest.raises(ValueError, match="KVSCHED_GHOST='fast': choose one of auto, cxx, python"):
        ghost_choice({"KVSCHED_GHOST": "fast"})
    assert isinstance(new_ghost(4, "python"), LruGhost)


@pytest.mark.parametrize("tier", [False, True])
def test_a_replay_decides_the_same_with_either_ghost(monkeypatch: pytest.MonkeyPatch, tier: bool) -> None:
    """The simulator's kvsched side with the tracker fed from the first request, on the reference then the compiled
    ghost: the same tracker counts, prefill and decisions."""
    require_cxx()
    from kvsched.core.config import RetentionConfig
    from kvsched.sim.generator import QUICK, generate
    from kvsched.sim.replay import ReplayConfig, replay

    trace = generate(replace(QUICK, workflows=2))
    cfg = ReplayConfig(capacity_blocks=int(trace.peak_live_blocks() / 1.5),
                       retention=RetentionConfig(default_ttl_s=120.0, max_ttl_s=600.0, payback_sampling=4,
                                                 payback_from_start=True),
                       tier_bytes=4096 * 64 if tier else 0, tier_block_bytes=4096 if tier else 0)
    out = []
    for choice in ("python", "cxx"):
        monkeypatch.setenv("KVSCHED_GHOST", choice)
        r = replay(trace, "kvsched", cfg)
        out.append((r.hit_tokens, r.restored_tokens, r.evictions, r.policy_stats))
    assert out[0][3]["payback_lru_hits"] > 0
    assert out[0] == out[1]
