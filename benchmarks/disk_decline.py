"""What does a spill the full disk level declines cost the engine step?

The FP8 host tier offers each block it evicts to the disk level (`TierLevels.on_host_evict`, in the step); on a full
disk whose blocks cannot go (each other session's tail is being read for a restore, pinned), the disk's bookkeeping
(`DiskDirectory.plan_writes`) looks for a block to evict, finds none and declines. The host tier then keeps that block
while another can go, and offers it a second time when none can. Measured here on the pure bookkeeping, no file:
`blocks` indexed blocks in sessions of `per_session` blocks, every session's tail pinned, the disk full; then
`declines` spills of one more session's blocks, each declined. Per decline: the mean, the first, the mean of the
others, and the worst. And the normal path beside it, which the decline's bookkeeping must not slow: the same disk
with no pin, each new session's turn of `per_session` blocks evicting the least recent sessions' tails (`turns`
of them), per block written.

    python benchmarks/disk_decline.py --out benchmarks/results/disk_decline.json

`--baseline FILE` runs the same declines, in the same invocation, on the `DiskDirectory` of another version of
kvsched/core/disk_tier.py (e.g. `git show cc2bafc:kvsched/core/disk_tier.py > /tmp/old_disk_tier.py`, before the
search remembered it found nothing), `--baseline-declines` of them (it may take seconds each).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent.parent))
from kvsched.bench.common import provenance, write_json  # noqa: E402
from kvsched.bench.plots import pyplot, save_beside, save_figure  # noqa: E402
from kvsched.core.disk_tier import DiskDirectory  # noqa: E402


def full_pinned(blocks: int, per_session: int, directory: Any = DiskDirectory) -> tuple[Any, int]:
    """A full disk of `blocks` blocks, sessions of `per_session`, each session's tail pinned (a restore reads it)."""
    d = directory(blocks, 1)
    sessions = blocks // per_session
    for s in range(sessions):
        keys = [(s, i) for i in range(per_session)]
        for k in d.plan_writes(s, keys, 0).write:
            d.done(k, True)
        d.claim(s, keys[-1:], per_session - 1)
    assert d.size == d.capacity == blocks
    return d, sessions


def one_size(blocks: int, per_session: int, declines: int, directory: Any = DiskDirectory) -> dict[str, Any]:
    d, sessions = full_pinned(blocks, per_session, directory)
    owner = "spiller"
    times: list[float] = []
    for i in range(declines):
        t = time.perf_counter()
        plan = d.plan_writes(owner, [(owner, i)], i)
        times.append(time.perf_counter() - t)
        assert not plan.write and not plan.delete, "the full pinned disk took a block"
    rest = times[1:] or times
    return {"blocks": blocks, "sessions": sessions, "per_session": per_session, "declines": declines,
            "mean_us": sum(times) / len(times) * 1e6, "first_us": times[0] * 1e6, "max_us": max(times) * 1e6,
            "after_first_mean_us": sum(rest) / len(rest) * 1e6, "searches": d.counters.get("eviction_searches"),
            "evicting_write_us": evicting_write_us(blocks, per_session, directory)}


def evicting_write_us(blocks: int, per_session: int, directory: Any = DiskDirectory, turns: int = 2000) -> float:
    """The normal path: a full disk, nothing pinned; each new session's turn writes `per_session` blocks, each
    evicting the least recent session's tail, reports them written, and restores its last one (claim, unpin).
    Microseconds per block written."""
    d = directory(blocks, 1)
    for s in range(blocks // per_session):
        for k in d.plan_writes(s, [(s, i) for i in range(per_session)], 0).write:
            d.done(k, True)
    t = time.perf_counter()
    for s in range(blocks // per_session, blocks // per_session + turns):
        keys = [(s, i) for i in range(per_session)]
        for k in d.plan_writes(s, keys, 0).write:
            d.done(k, True)
        d.claim(s, keys[-1:], per_session - 1)
        d.unpin(keys[-1:])
    return (time.perf_counter() - t) / (turns * per_session) * 1e6


def baseline_directory(path: Path) -> Any:
    """`DiskDirectory` of another version of kvsched/core/disk_tier.py, loaded from `path`."""
    spec = importlib.util.spec_from_file_location("_disk_tier_baseline", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.DiskDirectory


def show(side: str, row: dict[str, Any]) -> None:
    print(f"{side:>8} {row['blocks']:>7} blocks, {row['sessions']:>6} sessions of {row['per_session']:>3}: a declined "
          f"spill {row['mean_us']:>10.1f} us mean, first {row['first_us']:>10.1f} us, "
          f"later ones {row['after_first_mean_us']:>9.1f} us mean, worst {row['max_us']:>10.1f} us; an evicting write "
          f"{row['evicting_write_us']:.2f} us a block")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--blocks", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--per-session", type=int, nargs="+", default=[10, 100])
    p.add_argument("--declines", type=int, default=200)
    p.add_argument("--out", type=Path)
    p.add_argument("--baseline", type=Path, help="another version of kvsched/core/disk_tier.py, run in this invocation")
    p.add_argument("--baseline-declines", type=int, default=5)
    args = p.parse_args(argv)
    old = baseline_directory(args.baseline) if args.baseline else None
    rows, baseline_rows = [], []
    for blocks in args.blocks:
        for per in args.per_session:
            row = one_size(blocks, per, args.declines)
            rows.append(row)
            show("current", row)
            if old is not None:
                base = one_size(blocks, per, args.baseline_declines, old)
                baseline_rows.append({**base, "mean_over_current": base["mean_us"] / row["mean_us"]})
                show("baseline", base)
    out: dict[str, Any] = {**provenance(argv), "rows": rows}
    if old is not None:
        out["baseline"] = {"file": str(args.baseline), "rows": baseline_rows}
    write_json(args.out, out)
    save_beside(args.out, lambda path: plot(out, path))


def plot(result: dict[str, Any], path: Path) -> Path:
    """The first decline after a change and an evicting write per block, by disk size; the baseline beside (dashed)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sides = [("current", result["rows"], "-")]
    if "baseline" in result:
        sides.append(("baseline", result["baseline"]["rows"], "--"))
    for ax, key, title in ((axes[0], "first_us", "first decline after a change"),
                           (axes[1], "evicting_write_us", "an evicting write, per block")):
        for name, rows, style in sides:
            for i, per in enumerate(sorted({r["per_session"] for r in rows})):
                pts = sorted((r["blocks"], r[key]) for r in rows if r["per_session"] == per and key in r)
                ax.plot([b for b, _ in pts], [v for _, v in pts], style, marker="o", color=f"C{i}",
                        label=f"{name}, {per} blocks a session")
        ax.set(xscale="log", yscale="log", xlabel="blocks on disk", ylabel="us", title=title)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


if __name__ == "__main__":
    main()
