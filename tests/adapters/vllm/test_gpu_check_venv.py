"""`make gpu-check`'s venv, checked where no GPU is: a .venv-gpu that pip gave a CPU torch or vLLM's CPU build is
refused with the cause, not as "no CUDA device" (the recipe run against this CPU venv, its install step skipped)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def gpu_check(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    stamp = tmp_path / "installed"
    stamp.touch()  # newer than its prerequisites: make runs no install
    return subprocess.run(["make", "-s", "--no-print-directory", "gpu-check", f"GPU_VENV={ROOT / '.venv'}",
                           f"GPU_STAMP={stamp}"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_a_gpu_venv_with_a_cpu_torch_is_refused_naming_the_cause(tmp_path: Path) -> None:
    """torch's CPU wheels carry a local version (2.13.0+cpu) that pip ranks above PyPI's 2.13.0, so a find-links or
    index holding them (this image's PIP_FIND_LINKS=/opt/wheels: `pip install --dry-run torch==2.13.0` takes
    torch-2.13.0+cpu from it) gives .venv-gpu a CPU torch. Found by review: gpu-check then said "no CUDA device" on
    a machine that has one."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    import torch

    if torch.version.cuda is not None or torch.version.hip is not None:
        pytest.skip("this venv's torch is a GPU build")
    proc = gpu_check(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "CPU build" in out and torch.__version__ in out and "find-links" in out, out
    assert "no CUDA device" not in out and "passed" not in out, out
