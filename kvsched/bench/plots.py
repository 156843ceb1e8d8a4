"""PNG charts beside the benchmarks' JSON. matplotlib is imported lazily; without it a chart is skipped with a one-line
reason (the figures are in the JSON either way)."""

from __future__ import annotations

import math
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


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write (creating the folder) and close `fig`; returns `path`."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


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
    return save_figure(fig, path)


def line_chart(path: Path, lines: Sequence[tuple[Sequence[float], Sequence[float], str, str]], xlabel: str,
               ylabel: str, xscale: str = "linear", yscale: str = "linear", **yscale_args: Any) -> Path:
    """One line per (x, y, label, line style "-" or "--"), with markers; scales as matplotlib names them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for x, y, label, style in lines:
        ax.plot(x, y, marker="o" if style == "-" else ".", linestyle=style, label=label)
    ax.set_xscale(xscale)
    ax.set_yscale(yscale, **yscale_args)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_beside(json_path: Path | None, draw: Any) -> Path | None:
    """Draw the benchmark's chart beside its JSON (same name, .png); without matplotlib say so in one line."""
    if json_path is None:
        return None
    if json_path.suffix.lower() == ".png":  # the chart would overwrite the JSON just written (found by review)
        print(f"chart not written: {json_path} holds the JSON; give an --out ending in .json for both")
        return None
    if json_path.exists() and not json_path.is_file():  # /dev/stdout, a FIFO: no place beside it for a chart (found
        return None  # by review: /dev/stdout.png and /dev/null.png were created)
    try:
        path = draw(json_path.with_suffix(".png"))
    except PlotUnavailable as exc:
        print(exc)
        return None
    print(f"wrote {path}")
    return Path(path)


def grouped_bars(groups: Mapping[str, Mapping[str, float | None]], path: Path, title: str, ylabel: str,
                 reference: float | None = 1.0, log: bool = False, missing: str = "invalid") -> Path:
    """One group of bars per key of `groups` (e.g. a metric), one bar per inner key (e.g. a side); a dashed line at
    `reference` (the baseline's own value when bars are ratios to it). A None value (a side that does not compare)
    draws no bar but the word `missing` where it would stand; found by review: it was drawn as a bar of 0, which reads
    as "computed nothing"."""
    plt = pyplot()
    names = list(dict.fromkeys(k for g in groups.values() for k in g))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(len(names), 1) / 2 + 2), 4.2))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        values = [g.get(name, math.nan) for g in groups.values()]  # not in a group: no bar, no word
        ax.bar(xs, [math.nan if v is None else float(v) for v in values], width=width, label=name, color=f"C{j}")
        for x, v in zip(xs, values, strict=True):
            if v is None:
                ax.text(x, 0.0, missing, rotation=90, ha="center", va="bottom", fontsize=7, color=f"C{j}",
                        transform=ax.get_xaxis_transform())
    if reference is not None:
        ax.axhline(reference, color="grey", lw=1, ls="--")
    ax.set_xticks(range(len(groups)), list(groups), rotation=15, ha="right")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def side_ratios(result: Mapping[str, Any], sides: list[str], metrics: list[str], base: str = "stock"
                ) -> dict[str, dict[str, float | None]]:
    """metric -> side -> side's value over `base`'s (the bench JSON's shape: result[side][metric]); None where either
    side is marked `invalid` (it does not compare) or a value is missing."""
    out: dict[str, dict[str, float | None]] = {}
    bad = bool(result.get(base, {}).get("invalid"))
    for m in metrics:
        b = result.get(base, {}).get(m)
        out[m] = {s: (result[s].get(m) / b if b and result[s].get(m) is not None
                      and not bad and not result[s].get("invalid") else None)
                  for s in sides if s in result}
    return out
