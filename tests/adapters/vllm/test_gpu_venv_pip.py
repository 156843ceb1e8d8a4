"""`make gpu-check`'s installs into .venv-gpu read no find-links and no extra index, wherever they are set (the
environment or a pip config file), so a directory of torch's CPU wheels cannot give the GPU venv torch 2.13.0+cpu
(pip ranks it above PyPI's CUDA 2.13.0; found by review: this image's PIP_FIND_LINKS=/opt/wheels, also in
~/.config/pip/pip.conf, did). tools/gpu_venv_check.py stays as the second line of defence (test_gpu_check_venv.py).

The Makefile's own command lines are read with `make -n` for a venv under tmp_path (printed, never run: make would
install into the venv it is given) and their pip is asked, by `pip config list`, which settings it reads."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
WHEELS = "/nonexistent/cpu-wheels"  # what a CPU image names (/opt/wheels here); never read


def pip_installs(venv: Path) -> list[str]:
    """The GPU venv's `pip install` lines, as `make -n gpu-check` prints them."""
    proc = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check", f"GPU_VENV={venv}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    lines = [line for line in proc.stdout.splitlines() if f"{venv}/bin/python -m pip install" in line]
    assert len(lines) == 2 and "'.[gpu,dev]'" in lines[1], proc.stdout  # pip's own upgrade, then the project's
    return lines


@pytest.mark.parametrize("which", [0, 1], ids=["pip upgrade", "project install"])
def test_the_gpu_venv_pip_reads_no_find_links_nor_extra_index(which: int, tmp_path: Path) -> None:
    venv = tmp_path / "gpu"
    line = pip_installs(venv)[which]
    # the same command line, its pip asked what settings it reads instead of installing
    command = line.split(f"{venv}/bin/python -m pip install")[0] + f"{shlex.quote(sys.executable)} -m pip config list"
    (home := tmp_path / "home" / ".config" / "pip").mkdir(parents=True)
    (home / "pip.conf").write_text(f"[global]\nfind-links = {WHEELS}\nextra-index-url = file://{WHEELS}\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "PIP_FIND_LINKS": WHEELS,
           "PIP_EXTRA_INDEX_URL": f"file://{WHEELS}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert WHEELS not in proc.stdout and "find-links" not in proc.stdout, (command, proc.stdout)
    assert "extra-index-url" not in proc.stdout, (command, proc.stdout)
    # the check: without the Makefile's prefix the same pip reads both (the environment's and the config file's)
    plain = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                           timeout=120, env=env, check=True).stdout
    assert f":env:.find-links='{WHEELS}'" in plain and f"global.find-links='{WHEELS}'" in plain, plain
