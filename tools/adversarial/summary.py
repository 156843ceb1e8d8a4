"""Collect grid.py's runs into one result file: `python tools/adversarial/summary.py OUT.json NAME=RESULTS.tsv:SET ...`.

Each NAME is a configuration the grid ran (rows of setting SET in a results.tsv under the grid's OUT_DIR); the JSON holds, per trace and
live pressure, LRU's and kvsched's prefill tokens (the same `kvsched simulate` invocation: LRU is in the same run) and
their ratio for every NAME, with the machine and commit; the PNG beside it plots the ratios (1 = LRU's prefill)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from kvsched.bench.common import provenance


def read(spec: str) -> dict[tuple[str, float], dict[str, float]]:
    path, _, setting = spec.rpartition(":")
    rows: dict[tuple[str, float], dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        f = line.split("\t")
        if len(f) < 6 or f[3].startswith("ERROR") or f[1] != setting:
            continue
        rows[(f[0], float(f[2]))] = {"lru_prefill": int(f[3]), "kvsched_prefill": int(f[4]), "ratio": float(f[5])}
    return rows


def main() -> int:
    out = Path(sys.argv[1])
    sides = {name: read(path) for name, path in (a.rsplit("=", 1) for a in sys.argv[2:])}
    cases: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for name, rows in sides.items():
        for (trace, pressure), row in rows.items():
            cases[f"{trace} @ {pressure:g}x live"][name] = row
    worst = {name: max(r["ratio"] for r in rows.values()) for name, rows in sides.items() if rows}
    payload = {"cases": dict(sorted(cases.items())), "worst_ratio": worst,
               "config": {"provenance": provenance(["tools/adversarial/summary.py", *sys.argv[1:]]),
                          "traces": "python tools/adversarial/gen.py SHAPE OUT (seed 0), every shape",
                          "runs": "kvsched simulate TRACE --pressure P --pressure-basis live --policies lru,kvsched"}}
    out.write_text(json.dumps(payload, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted(cases)
    fig, ax = plt.subplots(figsize=(12, 0.28 * len(labels) + 1.5))
    height = 0.8 / max(len(sides), 1)
    for k, name in enumerate(sides):
        ys = [i + k * height for i in range(len(labels))]
        ax.barh(ys, [cases[c].get(name, {}).get("ratio", 0.0) for c in labels], height=height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_xlabel("kvsched prefill / LRU prefill (same run)")
    ax.set_xlim(0.3, max(1.25, max(worst.values(), default=1.0) + 0.02))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(json.dumps(worst))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
