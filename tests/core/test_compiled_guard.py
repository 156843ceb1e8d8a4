"""The mypyc build's staleness guard (kvsched/compiled.py): a compiled module never runs once any compiled source
changed, the manifest is missing or KVSCHED_PURE_PYTHON=1; then none of them runs (all or nothing), with one warning.

The tests marked "built" copy this checkout's package with its mypyc build (`make ext`) into a temporary directory and
import from there in a subprocess; without a build they are skipped and the fake-build tests still check the rules.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import kvsched
from kvsched import compiled

PACKAGE = Path(kvsched.__file__).parent
ROOT = PACKAGE.parent
BUILT = (PACKAGE / compiled.MANIFEST_NAME).exists()
built = pytest.mark.skipif(not BUILT, reason="no mypyc build in this checkout (`make ext`)")

# Tests that replace a compiled class's method (read-only once compiled): run here in pure mode when the package is
# compiled (they skip themselves in the compiled process, saying so).
PURE_ONLY = ["tests/core/test_release_index.py::test_dropping_stale_entries_changes_no_decision_and_scores_nothing"]

PROBE = (
    "import json, kvsched.compiled as c, importlib\n"
    "files = {m: importlib.import_module(m).__file__ for m in c.MODULES}\n"
    "print(json.dumps({'mode': c.mode, 'files': files}))\n"
)


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(PACKAGE, tmp_path / "kvsched", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path / "kvsched"


def _probe(root: Path, **env: str) -> tuple[dict[str, object], str]:
    run_env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV} | env | {"PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-W", "default", "-c", PROBE], cwd=root, env=run_env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout), out.stderr


def _kinds(result: dict[str, object]) -> set[str]:
    files = result["files"]
    assert isinstance(files, dict) and all(f.startswith(tempfile.gettempdir()) for f in files.values())  # the copy's
    return {"so" if f.endswith(".so") else "py" for f in files.values()}


@built
def test_an_unchanged_build_runs_compiled(tmp_path):
    result, err = _probe(_copy(tmp_path).parent)
    assert result["mode"] == "compiled" and _kinds(result) == {"so"} and "kvsched:" not in err


@built
def test_an_edited_source_runs_every_compiled_module_as_python_and_says_which(tmp_path):
    pkg = _copy(tmp_path)
    with open(pkg / "core" / "scoring.py", "a") as f:
        f.write("\nEDITED = 1\n")
    result, err = _probe(pkg.parent)
    assert _kinds(result) == {"py"}  # all of them, not only the edited one
    assert str(result["mode"]).startswith("pure: kvsched/core/scoring.py changed since the build")
    assert err.count("RuntimeWarning") == 1 and "kvsched/core/scoring.py changed" in err and "make ext" in err
    probe = "import kvsched.core.scoring as s; print(s.EDITED)"
    env = os.environ | {"PYTHONPATH": str(pkg.parent)}
    edited = subprocess.run([sys.executable, "-c", probe], cwd=pkg.parent, env=env, capture_output=True, text=True,
                            check=True)
    assert edited.stdout.strip() == "1"  # the edit runs


@built
@pytest.mark.parametrize("remove", [compiled.MANIFEST_NAME, "_compiled__mypyc"])
def test_a_build_without_its_manifest_or_shared_library_runs_python(tmp_path, remove):
    pkg = _copy(tmp_path)
    for f in pkg.iterdir():
        if f.name.startswith(remove):
            f.unlink()
    result, err = _probe(pkg.parent)
    assert _kinds(result) == {"py"} and str(result["mode"]).startswith("pure: ") and "make ext" in err


@built
def test_the_environment_variable_runs_python_without_a_warning(tmp_path):
    result, err = _probe(_copy(tmp_path).parent, **{compiled.PURE_ENV: "1"})
    assert _kinds(result) == {"py"} and result["mode"] == f"pure: {compiled.PURE_ENV}=1" and "RuntimeWarning" not in err


@built
@pytest.mark.skipif(compiled.mode != "compiled", reason="this process runs pure Python: they ran in it")
@pytest.mark.parametrize("node", PURE_ONLY)
def test_the_tests_that_patch_compiled_methods_pass_in_pure_mode(node):
    env = os.environ | {compiled.PURE_ENV: "1"}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-2000:]


def _fake_build(tmp_path: Path, modules: list[str]) -> Path:
    """A package with two modules, a shim file for each and the manifest a build would write."""
    pkg = tmp_path / "pkg"
    (pkg / "core").mkdir(parents=True)
    for m in modules:
        Path(compiled.source_path(m, str(pkg))).write_text(f"NAME = {m!r}\n")
        Path(compiled.source_path(m, str(pkg))[:-3] + ".cpython-311-x86_64-linux-gnu.so").write_text("")
    (pkg / "_compiled__mypyc.cpython-311-x86_64-linux-gnu.so").write_text("")
    (pkg / compiled.MANIFEST_NAME).write_text(json.dumps(compiled.manifest(str(pkg), modules)))
    return pkg


def test_the_manifest_rules_without_a_build(tmp_path):
    modules = ["kvsched.core.a", "kvsched.core.b"]
    pkg = _fake_build(tmp_path, modules)
    assert compiled.stale_reason(str(pkg), modules) is None
    assert compiled.stale_reason(str(pkg), modules[:1]) == "the compiled module set differs from kvsched/compiled.py's"
    (pkg / "core" / "b.py").write_text("NAME = 'edited'\n")
    assert compiled.stale_reason(str(pkg), modules) == "pkg/core/b.py changed since the build"
    (pkg / compiled.MANIFEST_NAME).unlink()
    assert compiled.stale_reason(str(pkg), modules) == "the build's manifest is missing"
    for so in (pkg / "core").glob("*.so"):
        so.unlink()
    assert compiled.stale_reason(str(pkg), modules) is None  # nothing built: plain Python, nothing to say


def test_the_finder_hands_out_the_source_for_compiled_names_only(tmp_path):
    modules = ["kvsched.core.a"]
    pkg = _fake_build(tmp_path, modules)
    finder = compiled.SourceFinder(modules, str(pkg))
    spec = finder.find_spec("kvsched.core.a")
    assert spec is not None and spec.origin == str(pkg / "core" / "a.py")
    assert finder.find_spec("kvsched.core.other") is None


def test_a_module_taken_out_of_the_list_runs_its_source_not_the_last_build(tmp_path, monkeypatch):
    """Found when a trial build of more modules was reverted: the guard went pure, but its finder covered the shorter
    list only, so the modules taken out of it were imported from the stale build's files beside their sources."""
    pkg = _fake_build(tmp_path, ["kvsched.core.a", "kvsched.core.b"])
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, compiled.SourceFinder)])
    monkeypatch.setattr(compiled, "mode", compiled.mode)
    with pytest.warns(RuntimeWarning, match="the compiled module set differs"):
        mode = compiled.install(str(pkg), ["kvsched.core.a"])
    assert mode == "pure: the compiled module set differs from kvsched/compiled.py's"
    finder = sys.meta_path[0]
    assert isinstance(finder, compiled.SourceFinder)
    spec = finder.find_spec("kvsched.core.b")
    assert spec is not None and spec.origin == str(pkg / "core" / "b.py")
    assert finder.find_spec("kvsched.core.other") is None
