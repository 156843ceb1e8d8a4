"""`make gpu-check`'s venv check (tools/gpu_venv_check.py), run here against this CPU venv: a .venv-gpu that pip gave
a CPU torch is refused with the cause, not as "no CUDA device". The script is run directly, never through make: make
would install into the venv it is given when its stamp looks out of date."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from tests import ahead
from tests.ahead import Run

ROOT = Path(__file__).resolve().parents[3]
TEST = "test_a_gpu_venv_with_a_cpu_torch_is_refused_naming_the_cause"


def venv_check() -> Run | None:
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        return None  # the test skips
    return Run([sys.executable, str(ROOT / "tools" / "gpu_venv_check.py")],
               env={"PIP_FIND_LINKS": "/opt/wheels", "PATH": "/usr/bin:/bin"})


AHEAD = {TEST: venv_check}  # tests/ahead.py


def test_a_gpu_venv_with_a_cpu_torch_is_refused_naming_the_cause() -> None:
    """torch's CPU wheels carry a local version (2.13.0+cpu) that pip ranks above PyPI's 2.13.0, so a find-links or
    index holding them (this image's PIP_FIND_LINKS=/opt/wheels: `pip install --dry-run torch==2.13.0` takes
    torch-2.13.0+cpu from it) gives .venv-gpu a CPU torch. Found by review: gpu-check then said "no CUDA device" on
    a machine that has one."""
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        pytest.skip("this venv's torch is a GPU build")
    proc = ahead.result(sys.modules[__name__], TEST, timeout_s=120)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    out = proc.stderr
    assert "CPU build" in out and torch.__version__ in out and "PIP_FIND_LINKS=/opt/wheels" in out, out
    assert "no CUDA device" not in out, out


def test_gpu_check_runs_the_venv_check_before_the_gpu_tests() -> None:
    recipe = re.search(r"^gpu-check:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    lines = recipe.group(1).splitlines()
    assert "tools/gpu_venv_check.py" in lines[0] and "pytest" in lines[1], lines
