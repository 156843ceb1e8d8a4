"""PNG charts beside the benchmarks' JSON. matplotlib is imported lazily; without it a chart is skipped with a one-line
reason (the figures are in the JSON either way)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed: charts cannot be drawn."""


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or PlotUnavailable with the install hint."""
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotUnavailable("no chart: matplotlib is not installed (pip install matplotlib, or the cpu/gpu "
                              "extra of kvsched)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ttft_by_turn(turns: Sequence[Sequence[Any]]) -> dict[int, list[float]]:
    """TTFTs grouped by the turn's index within its session, from `[session, turn_index, sent_s, ttft_s]` rows."""
    out: dict[int, list[float]] = {}
    for _session, turn, _sent, ttft in turns:
        if ttft is not None:
            out.setdefault(int(turn), []).append(float(ttft))
    return dict(sorted(out.items()))


def ttft_chart(sides: Mapping[str, Sequence[Sequence[Any]]], path: Path, title: str) -> Path:
    """Every turn's time to first token by its index within the session (points), and the median per index (line),
    one colour per side: turn 0 prefills a fresh context on every side; later turns show what retention saves."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (name, turns) in enumerate(sides.items()):
        by_turn = ttft_by_turn(turns)
        colour = f"C{i}"
        offset = (i - (len(sides) - 1) / 2) * 0.12
        for turn, values in by_turn.items():
            ax.scatter([turn + offset] * len(values), values, s=9, alpha=0.35, color=colour, linewidths=0)
        ax.plot(list(by_turn), [statistics.median(v) for v in by_turn.values()], marker="o", color=colour,
                label=f"{name} (median)")
    ax.set_xlabel("turn within the session (0 = first request)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
