"""The chart `kvsched bench router --out X.json` writes beside its JSON (X.png): affinity against load balance for
every router (simulated fleets and, with `--real`, the real deployment), and the kill scenario's timeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvsched.bench.plots import pyplot, save_figure

OUTCOME_COLOURS = {"ok": "C0", "failed": "C3", "cut": "C1"}


def router_chart(result: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    kill = (result.get("real_2_replicas") or {}).get("kill")
    fig, axes = plt.subplots(1, 2 if kill else 1, figsize=(12 if kill else 6.5, 4.4), squeeze=False)
    ax = axes[0][0]
    points: list[tuple[str, str, float, float]] = []
    for n, row in result["by_replicas"].items():
        for p in ("kvsched", "consistent_hash", "pow2"):
            points.append((p, f"sim n={n}", row[p]["max_over_mean_load"], row[p]["affinity"]))
    for p, r in ((result.get("real_2_replicas") or {}).get("policies") or {}).items():
        if r.get("affinity") is not None and r.get("max_over_mean_load") is not None:
            points.append((p, "real n=2", r["max_over_mean_load"], r["affinity"]))
    colours = {"kvsched": "C0", "consistent_hash": "C1", "pow2": "C2"}
    markers: dict[str, str] = {}
    for policy, where, load, affinity in points:
        marker = markers.setdefault(where, "os^Dv"[len(markers) % 5])
        ax.scatter([load], [affinity], color=colours.get(policy, "C7"), marker=marker, s=50, alpha=0.85)
    handles = [ax.scatter([], [], color=c, marker="o", label=p) for p, c in colours.items()]
    handles += [ax.scatter([], [], color="grey", marker=m, label=w) for w, m in markers.items()]
    ax.legend(handles=handles, fontsize=7, loc="center right")
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.axvline(1.25, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("max / mean load (work per replica)")
    ax.set_ylabel("affinity (follow-up turns on the session's replica)")
    ax.set_title("routers: stickiness against balance")
    ax.grid(True, alpha=0.3)
    if kill:
        ax = axes[0][1]
        for outcome, colour in OUTCOME_COLOURS.items():
            rows = [r for r in kill["timeline"] if r[2] == outcome]
            ys = [int(r[1].split("-")[-1]) if r[1] else -1 for r in rows]
            ax.scatter([r[0] for r in rows], ys, s=6, color=colour, label=f"{outcome} ({len(rows)})")
        retried = [r for r in kill["timeline"] if r[3] > 1]
        ax.scatter([r[0] for r in retried], [int(r[1].split("-")[-1]) for r in retried], s=30, facecolors="none",
                   edgecolors="C3", label=f"retried ({len(retried)})")
        ax.axvline(kill["kill_at_s"], color="C3", lw=1, label="vllm serve of slot-0 killed")
        if kill.get("recovery_s") is not None:
            ax.axvline(kill["kill_at_s"] + kill["recovery_s"], color="C2", lw=1, label="replacement answers")
        ax.set_yticks([-1, 0, 1], ["error", "slot-0", "slot-1"])
        ax.set_xlabel("seconds into the kill scenario (turn sent)")
        ax.set_title("kill scenario: where each turn was answered")
        ax.legend(fontsize=7, loc="center right")
    return save_figure(fig, path)
