"""Does the FP8 tier's `pool_holds` lookup meet vLLM's duplicate blocks of one hash, and answer wrong?

    python benchmarks/results/tiercost/dup_probe.py SESSIONS STEPS TIER_GIB

vLLM does not de-duplicate a full block computed twice (NOTE #1 in v1/core/block_pool.py's BlockHashToBlockMap): one
hash may map to several blocks, and `get_one_block`, which the lookup reads (kvsched.adapters.vllm.compat.pool_holds),
returns the first. One round of `kvsched bench sched --tier`'s load (seed 0) with a tier of TIER_GIB GiB; prints the
lookups, those whose hash maps to several blocks (`dup`), those of them that said "not held" while another copy was
referenced (`false_negative`: the only wrong answer possible), and the hashes the prefix cache maps to several blocks
at the end (`dup_hashes_end`, of `hashes_end`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any


def main() -> None:
    sessions, steps, gib = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    from tier_round import tier_round

    from kvsched.adapters.vllm.compat.blocks import block_pool

    r, d = tier_round(sessions, gib)
    cache = block_pool(r.s).cached_block_hash_to_block._cache
    counts: Counter[str] = Counter()
    holds = d.reach.pool_holds
    group0 = (0).to_bytes(4, "big")  # vLLM's make_block_hash_with_group_id(key, 0)

    def counted(key: Any) -> bool:
        held = bool(holds(key))
        counts["lookups"] += 1
        counts["held"] += held
        blocks = cache.get(key + group0) if isinstance(key, bytes) else None
        if type(blocks) is dict:
            counts["dup"] += 1
            any_held = any(b.ref_cnt > 0 for b in blocks.values())
            counts["false_negative"] += any_held and not held
        return held

    d.reach.pool_holds = counted
    for _ in range(steps):
        r.step()
    counts["dup_hashes_end"] = sum(type(v) is dict for v in cache.values())
    counts["hashes_end"] = len(cache)
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
