"""`make gpu-check`'s venv check (tools/gpu_venv_check.py) hides an index URL's whole user part (review70): pip reads
a URL's user part up to the last `@` of its authority (urllib's `netloc.rpartition("@")`), so a password holding an
unescaped `@` (`https://user:p@ss@host/simple`) is one pip uses, and the redaction cut at its first `@`, printing the
rest of the password. Run as tests/adapters/vllm/test_gpu_check_secrets.py runs it: a bare interpreter over a stand-in
CPU torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.adapters.vllm.test_gpu_check_vllm_cpu import CUDA_TORCH, ROOT


def test_a_password_with_an_at_sign_is_hidden_whole(tmp_path: Path) -> None:
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(CUDA_TORCH.replace("cuda = '12.8'", "cuda = None"))
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin",
           "PIP_INDEX_URL": "https://__token__:pw@rest-of-s3cret@idx.example/simple/@scope?x=a@b",
           "PIP_FIND_LINKS": "/opt/wheels https://u:a@b@fury.example/me/ https://plain.example/@x"}
    proc = subprocess.run([sys.executable, "-S", str(ROOT / "tools" / "gpu_venv_check.py")], capture_output=True,
                          text=True, timeout=60, check=False, env=env)
    assert proc.returncode == 1 and "CPU build" in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stderr and "a@b@" not in proc.stderr, proc.stderr
    assert "PIP_INDEX_URL=https://***@idx.example/simple/@scope?x=a@b" in proc.stderr, proc.stderr  # path: as given
    links = "PIP_FIND_LINKS=/opt/wheels https://***@fury.example/me/ https://plain.example/@x"
    assert links in proc.stderr, proc.stderr
