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
