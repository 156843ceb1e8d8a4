"""Worker "in_engine"'s check of a `--config FILE` (kvsched.serving_in_engine.in_engine_conflict) on files that are no
plain YAML of options: found by review, a FIFO blocked the check for ever (a Ray driver's config parse, a replica's
start), and a few hundred bytes of YAML aliases took the check minutes and gigabytes. Each case runs in a child process
with a deadline, so a hang fails the test instead of the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvsched.serving_in_engine import MAX_CONFIG_BYTES

DEADLINE_S = 20  # the checks below take milliseconds; the failures they guard against never ended
MEMORY = 2 * 2**30  # bytes the child may map (the alias YAML went past it)
CHECK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
from kvsched.serving_in_engine import in_engine_conflict
print(in_engine_conflict(["--config", sys.argv[1]], file_elsewhere=sys.argv[2] == "elsewhere"))
"""


def check(path: Path, where: str = "here") -> str:
    """in_engine_conflict of `--config path` in a child process: its answer (None or the refusal)."""
    done = subprocess.run([sys.executable, "-c", CHECK.format(memory=MEMORY), str(path), where], capture_output=True,
                          text=True, timeout=DEADLINE_S, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def alias_yaml(levels: int, *, mapping: bool) -> str:
    """A YAML of 10**levels leaves in a few hundred bytes (each level ten aliases of the one before), and a rank."""
    if mapping:
        lines = ["a0: &a0 {" + ", ".join(f"k{i}: x" for i in range(10)) + "}"]
        lines += [f"a{n}: &a{n} {{" + ", ".join(f"k{i}: *a{n - 1}" for i in range(10)) + "}" for n in range(1, levels)]
    else:
        lines = ["a0: &a0 [" + ", ".join("x" * 10) + "]"]
        lines += [f"a{n}: &a{n} [" + ", ".join([f"*a{n - 1}"] * 10) + "]" for n in range(1, levels)]
    return "\n".join([*lines, "tensor-parallel-size: 2", ""])


def test_a_fifo_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    os.mkfifo(fifo := tmp_path / "serve.yaml")
    assert "not a regular file" in check(fifo) and "cannot read it" in check(fifo)
    assert check(fifo, "elsewhere") == "None"  # the driver leaves it to the replica, which refuses it (above)


def test_a_directory_or_a_device_is_refused_naming_it(tmp_path: Path) -> None:
    """(Refused before too, in the words of open() or of the YAML reader.)"""
    (folder := tmp_path / "serve.yaml").mkdir()
    assert "not a regular file" in check(folder) and str(folder) in check(folder)
    assert "not a regular file" in check(Path("/dev/zero"))


def test_a_file_past_the_limit_is_refused(tmp_path: Path) -> None:
    (big := tmp_path / "serve.yaml").write_text("max-num-seqs: 4\n" + "#" * MAX_CONFIG_BYTES + "\n")
    assert f"over {MAX_CONFIG_BYTES} bytes" in check(big)
    (fits := tmp_path / "fits.yaml").write_text("tensor-parallel-size: 2\n" + "#" * (MAX_CONFIG_BYTES - 100) + "\n")
    assert "--tensor-parallel-size 2 (in --config" in check(fits)


@pytest.mark.parametrize("mapping", [False, True])
def test_aliases_are_read_in_their_size_not_written_out(tmp_path: Path, mapping: bool) -> None:
    (bomb := tmp_path / "serve.yaml").write_text(text := alias_yaml(9, mapping=mapping))
    assert len(text) < 1000
    assert "--tensor-parallel-size 2 (in --config" in check(bomb)


def test_a_file_that_is_no_utf8_is_refused_as_vllm_fails_to_read_it(tmp_path: Path) -> None:
    (latin := tmp_path / "serve.yaml").write_bytes(b"served-model-name: caf\xe9\ntensor-parallel-size: 2\n")
    assert "cannot read it" in check(latin) and "utf-8" in check(latin)
