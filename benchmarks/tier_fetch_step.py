"""Does restoring a moved session from the shared store stall the engine's step?

A session that moves to another replica (its home died, overflow, scale-down) is restored from the shared store
(docs/shared_store.md). Before, the worker read all its blocks in one MGET inside the engine step: every running
request's step waited for the whole transfer. Now the reads run on the worker's fetch thread in chunks of
KVSCHED_TIER_FETCH_MB. Measured here in one run, on a real `redis-server` (loopback) and the tier's real worker code,
blocks the size of an 8B model's 16-token FP8 block (32 layers x 8 KV heads x 16 tokens x 256 bytes: ~1 MiB):
- `inline`: the same chunks read, checked and filled on the calling thread: what the step used to wait for (at
  best: the old single MGET of a whole large session also outlasted the store's 0.5 s socket timeout);
- `in_step`: what `start_fetch` costs the step now; `landed`: until the last chunk was filled, in the background;
- `step_ms`: a stand-in engine step (a fixed torch matmul loop, ~10 ms) timed idle and while the fetch runs: what the
  fetch thread costs the steps that overlap it (it shares the GIL and the memory bandwidth).

    python benchmarks/tier_fetch_step.py --out benchmarks/results/tier_fetch_step.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from store_probe import free_port, running, wait_port  # noqa: E402

from kvsched.adapters.vllm import tier_blob  # noqa: E402
from kvsched.adapters.vllm.fp8_tier_store import TierStore  # noqa: E402
from kvsched.adapters.vllm.tier_layout import LayerView  # noqa: E402
from kvsched.adapters.vllm.tier_levels import SHARED, Fetch, LevelOps  # noqa: E402
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig  # noqa: E402
from kvsched.adapters.vllm.tier_levels_worker import TierLevelsWorker  # noqa: E402
from kvsched.adapters.vllm.tier_meta import TierWorkerMeta  # noqa: E402
from kvsched.bench.common import provenance, write_json  # noqa: E402
from kvsched.bench.plots import line_chart, save_beside  # noqa: E402
from kvsched.core.shared_state import block_key  # noqa: E402

LAYERS, HEADS, ROWS, CONTENT = 32, 8, 16, 256
IDENT = "ab" * 16


def store_of(blocks: int, seed: int) -> TierStore:
    g = torch.Generator().manual_seed(seed)
    views = [LayerView(f"layer.{i}", torch.randn(blocks, HEADS, ROWS, CONTENT, generator=g).to(torch.bfloat16))
             for i in range(LAYERS)]
    return TierStore(views, "quantize")


def stand_in_step(a: torch.Tensor) -> float:
    t = time.perf_counter()
    for _ in range(4):
        a = torch.tanh(a @ a)
    return (time.perf_counter() - t) * 1000


def one_size(url: str, client: Any, n: int, fetch_mb: float) -> dict[str, Any]:
    src = store_of(n, seed=1)
    src.store(list(range(n)), list(range(n)))
    keys = [i.to_bytes(4, "big") * 8 for i in range(n)]
    client.flushall()
    client.mset({block_key(IDENT, k, 0): tier_blob.encode(IDENT, 0, k, src.slot_payload(i))
                 for i, k in enumerate(keys)})
    payload = src.payload_len
    del src
    fetches = [Fetch(k, i, SHARED) for i, k in enumerate(keys)]

    def worker() -> TierLevelsWorker:
        w = TierLevelsWorker(LevelsConfig(store_url=url, fetch_mb=fetch_mb), IDENT, {"model": "bench"}, 0, 1,
                             store_of(n, seed=2))
        return w

    w = worker()  # the old way: every block read, checked and filled on the calling thread (in the same chunks: one
    # MGET of a whole large session outlasts the store's 0.5 s socket timeout, and the old step then recomputed all)
    per_chunk = max(1, int(fetch_mb * 2**20) // tier_blob.framed_len(len(keys[0]), payload))
    t = time.perf_counter()
    ok = [r for i in range(0, n, per_chunk) for r in w._fetch(fetches[i:i + per_chunk])]
    inline_s = time.perf_counter() - t
    assert all(filled for _, filled in ok), f"{sum(not x for _, x in ok)} of {n} published blocks did not come back: {dict(w.counters)}"
    w.close()

    a = torch.randn(384, 384)
    idle = [stand_in_step(a) for _ in range(30)]
    w = worker()
    t = time.perf_counter()
    w.start_fetch(LevelOps(fetches=fetches))
    in_step_s = time.perf_counter() - t
    landed: list[Any] = []
    during: list[float] = []
    while len(landed) < n:
        during.append(stand_in_step(a))  # the engine's steps go on meanwhile
        meta = TierWorkerMeta()
        w.fill(meta)
        landed += meta.fetch_landed
    landed_s = time.perf_counter() - t
    assert all(filled for _, _, filled in landed)
    w.close()
    return {"blocks": n, "block_payload_bytes": payload, "mib": round(n * payload / 2**20, 1), "fetch_mb": fetch_mb,
            "inline_ms": round(inline_s * 1000, 2), "in_step_ms": round(in_step_s * 1000, 3),
            "landed_ms": round(landed_s * 1000, 2),
            "step_ms_idle": {"median": round(statistics.median(idle), 3), "max": round(max(idle), 3)},
            "step_ms_during_fetch": {"median": round(statistics.median(during), 3), "max": round(max(during), 3),
                                     "steps": len(during)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, action="append", default=None, help="session sizes (default 64, 256, 512)")
    p.add_argument("--fetch-mb", type=float, default=64.0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    exe = shutil.which("redis-server")
    if exe is None:
        print("tier_fetch_step: needs redis-server (apt-get install -y redis-server)", file=sys.stderr)
        return 2
    import redis

    torch.set_num_threads(1)  # the engine's step on one core, the fetch thread on the other
    port = free_port()
    rows = []
    with running([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]):
        wait_port(port)
        client = redis.Redis(host="127.0.0.1", port=port)
        for n in args.blocks or [64, 256, 512]:
            rows.append(one_size(f"redis://127.0.0.1:{port}/0", client, n, args.fetch_mb))
            r = rows[-1]
            print(f"{r['blocks']} blocks ({r['mib']} MiB): inline {r['inline_ms']} ms; now in the step "
                  f"{r['in_step_ms']} ms, landed after {r['landed_ms']} ms; stand-in step median "
                  f"{r['step_ms_idle']['median']} ms idle, {r['step_ms_during_fetch']['median']} ms during "
                  f"(max {r['step_ms_during_fetch']['max']})", flush=True)
    result = {"sizes": rows, "config": {"layers": LAYERS, "heads": HEADS, "rows": ROWS, "content": CONTENT,
                                        "provenance": provenance()}}
    write_json(args.out, result)
    save_beside(args.out, lambda path: plot(rows, path))
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    x = [r["mib"] for r in rows]
    lines = [(x, [r["inline_ms"] for r in rows], "in the step before (one MGET, inline)", "-"),
             (x, [r["in_step_ms"] for r in rows], "in the step now (start_fetch)", "-"),
             (x, [r["landed_ms"] for r in rows], "landed, in the background", "--")]
    return line_chart(path, lines, "session restored from the shared store, MiB (FP8)", "ms", yscale="symlog",
                      linthresh=1)


if __name__ == "__main__":
    sys.exit(main())
