"""`make gpu-check`'s venv check (tools/gpu_venv_check.py), what review69 found: the CPU-torch refusal printed
PIP_INDEX_URL and PIP_FIND_LINKS as given, an index's token with them (make's output, a CI log); and vLLM's +cpu
local version was looked for between dots only (PEP 440 reads `+cpu_avx512` and `+cpu-avx512` as `+cpu.avx512`). Run
as tests/adapters/vllm/test_gpu_check_vllm_cpu.py runs it: a bare interpreter over stand-in distributions."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.adapters.vllm.test_gpu_check_vllm_cpu import CUDA_TORCH, ROOT, check


def test_a_local_version_with_dashes_or_underscores_is_read_as_pep_440_does(tmp_path: Path) -> None:
    """PEP 440 reads `+cpu-avx512` and `+cpu_avx512` as `+cpu.avx512` (found by review69: only dots were split)."""
    proc = check(tmp_path, {"vllm": "0.32.0+cpu_avx512"})
    assert proc.returncode == 1 and "vLLM's CPU build (vllm 0.32.0+cpu_avx512)" in proc.stderr, proc.stderr


def test_the_index_urls_user_part_is_not_printed(tmp_path: Path) -> None:
    """Found by review69: the CPU-torch refusal printed PIP_INDEX_URL and PIP_FIND_LINKS as given, an index's token
    with them (make's output, a CI log)."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(CUDA_TORCH.replace("cuda = '12.8'", "cuda = None"))
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin",
           "PIP_INDEX_URL": "https://__token__:pypi-s3cret@idx.example/simple",
           "PIP_FIND_LINKS": "/opt/wheels https://t0ken@fury.example/me/"}
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "tools" / "gpu_venv_check.py")], capture_output=True,
                          text=True, timeout=60, check=False, env=env)
    assert proc.returncode == 1 and "CPU build" in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stderr and "t0ken" not in proc.stderr and "__token__" not in proc.stderr, proc.stderr
    assert "PIP_INDEX_URL=https://***@idx.example/simple" in proc.stderr, proc.stderr
    assert "PIP_FIND_LINKS=/opt/wheels https://***@fury.example/me/" in proc.stderr, proc.stderr
