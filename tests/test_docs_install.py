"""What the README's "Installing" promises a pip user, checked without installing anything: a command that needs a
module only an extra (`cpu`, `gpu`) installs says so in one line, not in a traceback (found by following the README
from a blank venv: after `pip install .`, `kvsched tiny-model` ended in "ModuleNotFoundError: No module named
'torch'")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `kvsched ...` with these modules made unimportable, as in a venv where `pip install kvsched` ran without an extra.
WITHOUT = "import sys\nfor m in {mods!r}: sys.modules[m] = None\nfrom kvsched.cli import main\nsys.exit(main({argv!r}))"


def run_without(mods: tuple[str, ...], argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KVSCHED_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", WITHOUT.format(mods=mods, argv=argv)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("argv", [["tiny-model", "--out", "m"], ["simulate", "--generate", "--workflows", "1"]])
def test_a_command_without_torch_names_the_extra(argv: list[str], tmp_path: Path) -> None:
    done = run_without(("torch",), argv, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"kvsched {argv[0]}: error: needs torch") and "kvsched[cpu]" in line, line


def test_a_command_that_needs_no_extra_still_runs_without_them(tmp_path: Path) -> None:
    done = run_without(("torch", "vllm", "ray", "triton"), ["plan", "--preset", "llama-3.1-8b", "--context", "8192",
                                                             "--sessions", "10"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KV" in done.stdout


def test_another_missing_module_is_not_blamed_on_an_extra() -> None:
    from kvsched.cli import missing_extra

    assert missing_extra(ModuleNotFoundError("No module named 'torch.cpu'", name="torch.cpu"))
    assert missing_extra(ModuleNotFoundError("No module named 'kvsched.nope'", name="kvsched.nope")) is None
    assert missing_extra(ModuleNotFoundError("No module named 'x'")) is None
