"""What does the FP8 tier's slot checksum cost the engine thread, zlib.crc32 against the C++ CRC32C?

Every slot's CRC is computed when its store is sealed and again before a restore's copies start, on the engine thread
(fp8_tier_store). On a GPU a restore's PCIe copy runs at 25-50 GB/s, so a checksum slower than that sets a large
restore's time. Measured here in one run:
- `kernels`: GiB/s of zlib.crc32, the C++ CRC32C (SSE4.2 crc32 instruction) and its table path on 1/8/64 MiB buffers
  (the median of `--reps` passes, the buffer already in memory);
- `tier`: the tier's own calls on a store of blocks the size of an 8B model's 16-token FP8 block (32 layers x 8 KV
  heads x 16 tokens x 256 bytes + scales: ~1 MiB): `HostSlots.checksums` of the stored slots (the one call a seal
  makes, and a restore's check makes again), and the whole `TierStore.load` (check, reads, dequantize into a bf16 CPU
  cache), each with either function on the same slots.

    python benchmarks/tier_checksum.py --out benchmarks/results/tier_checksum.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvsched.adapters.vllm import tier_slots
from kvsched.adapters.vllm.fp8_tier_store import TierStore
from kvsched.adapters.vllm.tier_layout import LayerView
from kvsched.bench.common import provenance, write_json
from kvsched.bench.plots import line_chart, save_beside
from kvsched.ops import backends, checksum

LAYERS, HEADS, ROWS, CONTENT = 32, 8, 16, 256


def timed(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of `reps` calls (one untimed first)."""
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def kernels(sizes_mib: list[int], reps: int) -> list[dict[str, Any]]:
    mod = backends.cxx()
    rows = []
    for mib in sizes_mib:
        buf = np.random.default_rng(mib).integers(0, 256, size=mib << 20, dtype=np.uint8)
        fns: dict[str, Callable[[], Any]] = {"zlib.crc32": lambda b=buf: zlib.crc32(b.data)}
        if checksum.has_cxx_crc32c():
            fns["crc32c (C++, SSE4.2)" if mod.crc32c_hardware() else "crc32c (C++, table)"] = \
                lambda b=buf: mod.crc32c(b.ctypes.data, b.nbytes, 0)
            fns["crc32c (C++, table path)"] = lambda b=buf: mod.crc32c_portable(b.ctypes.data, b.nbytes, 0)
        row: dict[str, Any] = {"mib": mib}
        for name, fn in fns.items():
            row[name] = round(mib / 1024 / timed(fn, reps), 3)
        rows.append(row)
        print(f"{mib} MiB: " + ", ".join(f"{k} {v} GiB/s" for k, v in row.items() if k != "mib"), flush=True)
    return rows


def tier(blocks: int, reps: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(blocks)
    views = [LayerView(f"layer.{i}", torch.randn(blocks, HEADS, ROWS, CONTENT, generator=g).to(torch.bfloat16))
             for i in range(LAYERS)]
    store = TierStore(views, "quantize", measure_error=False)
    slots = list(range(blocks))
    store.store(slots, slots)
    row: dict[str, Any] = {"blocks": blocks, "mib": round(blocks * store.payload_len / 2**20, 1)}
    for fn in (tier_slots.ZLIB, tier_slots.CRC32C):
        if fn is tier_slots.CRC32C and not checksum.has_cxx_crc32c():
            continue
        store.slots.crc_fn = fn
        for s, crc in zip(slots, store.slots.checksums(slots), strict=True):
            store.crc[s] = crc  # sealed with this function, as a process that picked it would have
        seal = timed(lambda: store.slots.checksums(slots), reps)
        load = timed(lambda: store.load(slots, slots), reps)
        assert store.counters["checksum_failures"] == 0
        row[fn.name] = {"checksums_ms": round(seal * 1000, 3), "load_ms": round(load * 1000, 2)}
    print(f"{blocks} blocks ({row['mib']} MiB): " + "; ".join(
        f"{k}: checksums {v['checksums_ms']} ms (once at the seal, again at the check), whole load {v['load_ms']} ms"
        for k, v in row.items()
        if isinstance(v, dict)), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)  # the engine thread
    result = {"kernels": kernels(args.sizes_mib, args.reps), "tier": [tier(n, max(3, args.reps // 3))
                                                                     for n in args.blocks],
              "config": {"layers": LAYERS, "heads": HEADS, "rows": ROWS, "content": CONTENT, "reps": args.reps,
                         "crc32c_hardware": bool(getattr(backends.cxx(), "crc32c_hardware", lambda: False)()),
                         "provenance": provenance()}}
    write_json(args.out, result)
    save_beside(args.out, lambda path: plot(result["kernels"], path))
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    x = [r["mib"] for r in rows]
    names = [k for k in rows[0] if k != "mib"]
    lines = [(x, [r[n] for r in rows], n, "-" if "table path" not in n else "--") for n in names]
    return line_chart(path, lines, "buffer, MiB", "GiB/s (median)", xscale="log")


if __name__ == "__main__":
    sys.exit(main())
