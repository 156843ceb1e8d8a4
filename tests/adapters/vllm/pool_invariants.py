"""Block-pool invariants of kvsched's pins on vLLM's real block pool (from the pins review's scripts): every block's
reference count is its requests' plus its pins', the free queue holds exactly the unreferenced blocks, the policy
counts what the pins hold, and each pinned block is cached for its position in the session's prefix."""

from __future__ import annotations

from collections import Counter
from typing import Any


def count_preemptions(monkeypatch: Any, seen: Counter[str]) -> None:
    """Count vLLM's preemptions in `seen["preemptions"]` (a random walk must show it reached them)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    preempt = Scheduler._preempt_request

    def counted_preempt(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen["preemptions"] += 1
        return preempt(self, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "_preempt_request", counted_preempt)


def block_count_violations(km: Any, pinned: Counter[int]) -> list[str]:
    """vLLM's side of the invariants, for any pin holder: each block's reference count is its requests' plus
    `pinned[block id]`, and the free queue holds exactly the unreferenced blocks (KV cache manager `km`)."""
    holders: Counter[int] = Counter()
    for mgr in km.coordinator.single_type_managers:
        for blocks in mgr.req_to_blocks.values():
            holders.update(b.block_id for b in blocks if not b.is_null)
    errs = [f"block {b.block_id}: ref_cnt {b.ref_cnt} != requests {holders[b.block_id]} + pins {pinned[b.block_id]}"
            for b in km.block_pool.blocks if not b.is_null and b.ref_cnt != holders[b.block_id] + pinned[b.block_id]]
    q = km.block_pool.free_block_queue
    queued, node = [], q.fake_free_list_head.next_free_block
    while node is not q.fake_free_list_tail:
        queued.append(node.block_id)
        node = node.next_free_block
    zero = {b.block_id for b in km.block_pool.blocks if b.ref_cnt == 0 and not b.is_null}
    if len(queued) != q.num_free_blocks or len(set(queued)) != len(queued) or set(queued) != zero:
        errs.append(f"free queue {queued} != the unreferenced blocks {sorted(zero)}")
    return errs


def pool_violations(s: Any) -> list[str]:
    """What breaks the invariants on scheduler `s` now (empty when none does)."""
    errs: list[str] = []
    km = s.kv_cache_manager
    pins = s.kvsched.pins
    pinned = Counter(b.block_id for groups in pins.pinned.values() for g in groups for b in g)
    if Counter(dict(pins.pool.refs)) != pinned:
        errs.append(f"pool.refs {dict(pins.pool.refs)} != blocks in the pins {dict(pinned)}")
    if pins.pool.num_pinned() != len(pinned) or len(pins.pool.refs) != len(pinned):  # what the budget counts
        errs.append(f"num_pinned {pins.pool.num_pinned()} / len(refs) {len(pins.pool.refs)} != {len(pinned)} blocks")
    errs += block_count_violations(km, pinned)
    policy = s.kvsched.policy
    if policy.pinned_blocks_total != sum(r.pinned_blocks for r in policy.sessions.values()):
        errs.append("pinned_blocks_total != the sessions' sum")
    for key, groups in pins.pinned.items():
        rec = policy.sessions.get(key)
        if rec is None or rec.pinned_blocks != sum(map(len, groups)):
            errs.append(f"{key.session_id}: policy {rec and rec.pinned_blocks} != pinned {sum(map(len, groups))}")
    for key, rec in policy.sessions.items():
        if rec.pinned_blocks and key not in pins.pinned:
            errs.append(f"{key.session_id}: policy says {rec.pinned_blocks} pinned, the applier none")
    offered = sum(r.pinned_blocks for r in policy.sessions.values() if not r.active_requests or r.pin_beyond_running)
    if policy.index.releasable_blocks != offered:  # the shortage's O(1) bound (`RetentionPolicy.pressure_bound`)
        errs.append(f"releasable_blocks {policy.index.releasable_blocks} != the offered pins' {offered}")
    return errs + position_violations(s)


def position_violations(s: Any) -> list[str]:
    """Each pin group's blocks are distinct, cached, and the i-th is cached for prefix position start + i: start 0 but
    for a sliding-window group (its window's first block). A pin of several answers (a shared session's union pin, a
    companion keeping several: `kvsched.core.shared_turns`, `shared_answers`) holds a tree, not one prefix: each
    answer's blocks in it, in the pin's order, are a prefix of that answer's chain (positions start, start + 1, ...:
    no hole, which a tail-first release would otherwise leave), and every block is some answer's."""
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    errs: list[str] = []
    bs = s.kvsched.block_size
    pins = s.kvsched.pins
    managers = s.kv_cache_manager.coordinator.single_type_managers
    for key, groups in pins.pinned.items():
        chains = [c for c, _ in pins.others.chains[key]] if key in pins.others.chains else pins.joined.answers.get(key)
        for gi, g in enumerate(groups):
            ids = [b.block_id for b in g]
            if len(set(ids)) != len(ids):
                errs.append(f"{key.session_id} group {gi}: duplicate blocks in the pin {ids}")
            sliding = isinstance(managers[gi], SlidingWindowManager)
            start = (g[0].block_hash_num_tokens or bs) // bs - 1 if g and sliding else 0
            if any(b.block_hash is None for b in g):
                errs.append(f"{key.session_id} group {gi}: pinned blocks {ids} are not all cached")
            elif chains:
                errs += _tree_violations(f"{key.session_id}/{key.branch} group {gi}", g,
                                         [c[gi] for c in chains], pins.pool.cached_keys, bs, start)
            else:
                for i, b in enumerate(g):
                    if b.block_hash_num_tokens != (start + i + 1) * bs:
                        errs.append(f"{key.session_id} group {gi}: position {start + i} holds block {b.block_id} "
                                    f"cached for {b.block_hash_num_tokens} tokens")
    return errs


def _tree_violations(name: str, g: list[Any], chains: list[frozenset[Any]], keys: Any, bs: int,
                     start: int) -> list[str]:
    """`g`'s blocks against the answers' `chains` (content keys): each answer's blocks a prefix of it, in order."""
    errs = []
    pairs = keys(g)
    for c in chains:
        at = [b.block_hash_num_tokens // bs - 1 for b, (k, _) in zip(g, pairs, strict=True) if k in c]
        if at != list(range(start, start + len(at))):
            errs.append(f"{name}: an answer's blocks are at positions {at}, not a prefix of its chain in order")
    stray = [b.block_id for b, (k, _) in zip(g, pairs, strict=True) if not any(k in c for c in chains)]
    if stray:
        errs.append(f"{name}: blocks {stray} are no answer's")
    return errs
