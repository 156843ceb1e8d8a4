"""A module taken out of kvsched/compiled.py's MODULES keeps its old mypyc build beside its source; the next complete
build writes a manifest without it, so the guard reads the build as current and Python would import the stale file.
setup.py removes what `compiled.leftover_builds` lists after every complete mypyc build."""

from __future__ import annotations

import os
from pathlib import Path

from kvsched import compiled

SUFFIX = ".cpython-311-x86_64-linux-gnu.so"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_a_build_beside_a_source_outside_the_modules_is_a_leftover_and_nothing_else_is(tmp_path: Path) -> None:
    pkg = tmp_path / "kvsched"
    for name in ("core/kept.py", "core/dropped.py", "adapters/vllm/pins.py", "compiled.py"):
        _touch(pkg / name)
    kept = _touch(pkg / "core" / f"kept{SUFFIX}")
    dropped = _touch(pkg / "core" / f"dropped{SUFFIX}")
    adapter = _touch(pkg / "adapters" / "vllm" / f"pins{SUFFIX}")
    _touch(pkg / f"_C{SUFFIX}")  # the C++ extension: no source beside it
    _touch(pkg / f"_compiled__mypyc{SUFFIX}")  # mypyc's shared library
    _touch(pkg / "core" / f"orphan{SUFFIX}")  # no source: not a stale shadow of one
    found = compiled.leftover_builds(str(pkg), ("kvsched.core.kept",))
    assert found == sorted([str(dropped), str(adapter)])
    assert str(kept) not in found
    assert compiled.leftover_builds(str(pkg), ("kvsched.core.kept", "kvsched.core.dropped",
                                               "kvsched.adapters.vllm.pins")) == []


def test_the_checkout_has_no_leftover_build() -> None:
    """Whatever `make ext` built here is all in MODULES (an empty list without a build)."""
    assert compiled.leftover_builds() == [], [os.path.basename(p) for p in compiled.leftover_builds()]
