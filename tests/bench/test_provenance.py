"""What a benchmark JSON says about the code that made it: the commit of the kvsched source that ran (wherever the
command ran from), "-dirty" for changed code but not for result files, and the command line."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kvsched.bench.common import provenance


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for rel in ("kvsched/__init__.py", "benchmarks/results/run.json", "benchmarks/agents.py", "README.md"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-qm", "init")
    return root


def test_untracked_code_makes_the_commit_dirty_and_result_files_do_not(tmp_path):
    """Found by review: an untracked new module under kvsched/ left the commit clean (--untracked-files=no), and a
    results JSON rewritten by a run made it "-dirty"."""
    from kvsched.bench.common import git_state

    root = repo(tmp_path)
    head = git(root, "rev-parse", "HEAD")
    assert git_state(root) == (head, [])
    (root / "benchmarks/results/run.json").write_text("rewritten\n")  # a run's own output
    (root / "benchmarks/results/new.json").write_text("{}\n")
    (root / "notes.txt").write_text("untracked, not code\n")
    assert git_state(root) == (head, [])
    (root / "kvsched/new_module.py").write_text("x = 1\n")
    assert git_state(root) == (head + "-dirty", ["kvsched/new_module.py"])
    (root / "kvsched/new_module.py").unlink()
    (root / "benchmarks/new_bench.py").write_text("x = 1\n")
    assert git_state(root) == (head + "-dirty", ["benchmarks/new_bench.py"])
    (root / "benchmarks/new_bench.py").unlink()
    (root / "README.md").write_text("changed\n")
    assert git_state(root) == (head + "-dirty", ["README.md"])


def test_the_commit_is_the_running_kvsched_sources_not_the_current_directorys(tmp_path, monkeypatch):
    """Found by review: git ran in the current directory, so a bench started elsewhere recorded no commit (or another
    repository's)."""
    other = repo(tmp_path)
    monkeypatch.chdir(other)
    commit = provenance()["git_commit"]
    source = Path(__import__("kvsched").__file__).resolve().parents[1]
    assert commit is not None and commit.split("-")[0] == git(source, "rev-parse", "HEAD")
    assert commit.split("-")[0] != git(other, "rev-parse", "HEAD")
    from kvsched.bench.common import git_state

    assert git_state(tmp_path) == (None, [])  # not a work tree


def test_a_script_passed_as_argv_is_recorded_as_a_python_script():
    """Found by review: tools/adversarial/summary.py passes its argv and its JSON said `kvsched tools/...`."""
    assert provenance(["tools/adversarial/summary.py", "x.json"])["command"] == \
        "python tools/adversarial/summary.py x.json"
    assert provenance(["bench", "sched"])["command"] == "kvsched bench sched"
