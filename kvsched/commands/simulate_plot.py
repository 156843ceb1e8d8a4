"""`kvsched simulate --plot`: hit rate and prefill computed against the pool's size, each policy replayed at fractions
of the trace's working set (its own module to keep `simulate` under the 400-line limit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(trace: Any, policies: list[str], prefill_tok_s: float, bytes_per_token: int, directory: Path,
         tier: tuple[int, int] = (0, 0), retention: Any = None, replicas: int = 1,
         restore_bytes_per_s: float = 0.0) -> list[str]:
    """Replays at each fraction of the working set (the pool split over `replicas` as the table's), with the table's
    retention, tier and restore bandwidth (found by review: the curves replayed kvsched with the default retention,
    not the KVSCHED_* settings, on one replica and with free restores)."""
    from kvsched.bench.plots import pyplot
    from kvsched.commands.simulate import simulate

    plt = pyplot()  # PlotUnavailable (one line, the install hint) without matplotlib

    directory.mkdir(parents=True, exist_ok=True)
    ws = trace.working_set_blocks()
    fractions = [0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]
    runs = [simulate(trace, max(int(ws * f) // replicas, 1), policies, prefill_tok_s, bytes_per_token, tier,
                     restore_bytes_per_s=restore_bytes_per_s, retention=retention, replicas=replicas)
            for f in fractions]
    written = []
    for metric, label in (("hit_rate", "prefix hit rate"), ("prefill_tokens_computed", "prefill tokens computed")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for p in policies:
            ax.plot([f * 100 for f in fractions], [r[p][metric] for r in runs], marker="o", label=p)
        ax.set_xlabel("KV pool, % of the working set")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = directory / f"simulate_{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(str(path))
    return written
