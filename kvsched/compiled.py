"""Which modules mypyc compiles, and the guard that keeps a stale build from running.

`make ext` (setup.py's build_ext) compiles MODULES with mypyc into extension modules beside their sources and writes
MANIFEST_NAME: each module's source digest (sha256) at build time. Python's import prefers `x.so` over `x.py`, so in an
editable checkout a compiled module would otherwise shadow every later edit of its source. `install()` (run by
`kvsched/__init__.py`, before any of these modules can be imported) compares the manifest with the sources; if any
source differs, the manifest is missing or KVSCHED_PURE_PYTHON=1 is set, NONE of the compiled modules is used (they
call each other natively, so a mixed set would still run stale code): a finder first on `sys.meta_path` hands out the
`.py` source for every name in MODULES. This module itself is never compiled, and reads the standard library only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

# Chosen by profile (`python tools/sched_hook_timers.py 256 300` and `... 10000 300`): the per-turn bookkeeping.
MODULES: tuple[str, ...] = (
    "kvsched.core.retention",
    "kvsched.core.release_index",
    "kvsched.core.next_use",
    "kvsched.core.expiry",
    "kvsched.core.pin_apply",
    "kvsched.core.retention_records",
    "kvsched.core.scoring",
    "kvsched.core.return_model",
    "kvsched.core.lineage",
    "kvsched.core.lineage_tail",
    "kvsched.core.sessions",
    "kvsched.core.session_index",
    "kvsched.core.retention_values",
    "kvsched.core.pin_ledger",
    "kvsched.core.pin_payback",
)
# mypyc's shared library (all MODULES in one group, so their calls to each other are native): kvsched/_compiled__mypyc.
GROUP = "kvsched._compiled"
MANIFEST_NAME = "_compiled_manifest.json"
PURE_ENV = "KVSCHED_PURE_PYTHON"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

# "compiled", "pure" (nothing built) or "pure: <why>" (built but not used); set by install().
mode = "pure"


def source_path(module: str, package_dir: str = PACKAGE_DIR) -> str:
    """`kvsched.core.x` -> <package_dir>/core/x.py."""
    return os.path.join(package_dir, *module.split(".")[1:]) + ".py"


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def manifest(package_dir: str = PACKAGE_DIR, modules: Sequence[str] = MODULES) -> dict[str, object]:
    """What setup.py writes after a successful mypyc build: the sources' digests it compiled."""
    return {"group": GROUP, "modules": {m: digest(source_path(m, package_dir)) for m in modules}}


def leftover_builds(package_dir: str = PACKAGE_DIR, modules: Sequence[str] = MODULES) -> list[str]:
    """Compiled files (`x.*.so` beside `x.py`) of modules outside `modules`: a module taken out of MODULES keeps its
    old build beside its source, and after the next build (whose manifest no longer names it) Python would import that
    stale build in compiled mode. setup.py removes these after every complete mypyc build."""
    found = []
    for d, _, files in os.walk(package_dir):
        names = set(files)
        rel = os.path.relpath(d, package_dir)
        prefix = "kvsched." if rel == "." else "kvsched." + rel.replace(os.sep, ".") + "."
        for f in files:
            stem = f.split(".", 1)[0]
            if f.endswith((".so", ".pyd")) and stem + ".py" in names and prefix + stem not in modules:
                found.append(os.path.join(d, f))
    return sorted(found)


def _built(package_dir: str, modules: Sequence[str]) -> bool:
    """Is any compiled module present (a build without its manifest is stale too)?"""
    dirs: dict[str, set[str]] = {}
    for m in modules:
        d = os.path.dirname(source_path(m, package_dir))
        if d not in dirs:
            dirs[d] = set(os.listdir(d)) if os.path.isdir(d) else set()
        stem = m.rsplit(".", 1)[1] + "."
        if any(f.startswith(stem) and f.endswith((".so", ".pyd")) for f in dirs[d]):
            return True
    return False


def stale_reason(package_dir: str = PACKAGE_DIR, modules: Sequence[str] = MODULES) -> str | None:
    """Why the compiled modules must not be used, or None if the build matches every source."""
    try:
        with open(os.path.join(package_dir, MANIFEST_NAME)) as f:
            recorded = json.load(f).get("modules")
    except FileNotFoundError:
        return "the build's manifest is missing" if _built(package_dir, modules) else None
    except (OSError, ValueError, AttributeError) as exc:
        return f"the build's manifest is unreadable ({exc})"
    if not isinstance(recorded, dict) or set(recorded) != set(modules):
        return "the compiled module set differs from kvsched/compiled.py's"
    lib = GROUP.rsplit(".", 1)[1] + "__mypyc."
    if not any(f.startswith(lib) for f in os.listdir(package_dir)):
        return f"mypyc's shared library kvsched/{lib}*.so is missing"
    for m in modules:
        path = source_path(m, package_dir)
        try:
            now = digest(path)
        except OSError:
            return f"{path} is missing"
        if now != recorded[m]:
            return f"{os.path.relpath(path, os.path.dirname(package_dir))} changed since the build"
    return None


def _with_recorded(modules: Sequence[str], package_dir: str) -> list[str]:
    """`modules` and every other module the manifest says was built whose source is there: a module since taken out
    of MODULES keeps its compiled file beside its source until the next build, and would be imported from it (found
    when the adapters' trial build was reverted: the finder covered MODULES only, so the taken-out modules ran the
    stale build's code)."""
    try:
        with open(os.path.join(package_dir, MANIFEST_NAME)) as f:
            recorded = json.load(f).get("modules")
    except (OSError, ValueError, AttributeError):
        recorded = None
    extra = [m for m in recorded if m not in modules and isinstance(m, str) and m.startswith("kvsched.")
             and os.path.exists(source_path(m, package_dir))] if isinstance(recorded, dict) else []
    return [*modules, *extra]


class SourceFinder:
    """First on sys.meta_path: the `.py` source for every compiled module's name, so none of the builds is used."""

    def __init__(self, modules: Sequence[str], package_dir: str) -> None:
        self.paths = {m: source_path(m, package_dir) for m in modules}

    def find_spec(self, name: str, path: object = None, target: ModuleType | None = None) -> ModuleSpec | None:
        src = self.paths.get(name)
        return importlib.util.spec_from_file_location(name, src) if src is not None else None


def install(package_dir: str = PACKAGE_DIR, modules: Sequence[str] = MODULES) -> str:
    """Decide compiled or pure for this process (once, before any module of MODULES is imported); returns the mode."""
    global mode
    if not any(isinstance(f, SourceFinder) for f in sys.meta_path):
        why = f"{PURE_ENV}=1" if os.environ.get(PURE_ENV) == "1" else stale_reason(package_dir, modules)
        if why is None:
            mode = "compiled" if os.path.exists(os.path.join(package_dir, MANIFEST_NAME)) else "pure"
            return mode
        sys.meta_path.insert(0, SourceFinder(_with_recorded(modules, package_dir), package_dir))
        mode = f"pure: {why}"
        if not why.startswith(PURE_ENV):
            warnings.warn(
                f"kvsched: {why}; running every compiled module ({len(modules)}) as pure Python. "
                "`make ext` rebuilds them.",
                RuntimeWarning,
                stacklevel=2,
            )
    return mode
