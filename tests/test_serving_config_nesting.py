"""Worker "in_engine"'s check of a `--config FILE` (kvsched.serving_in_engine.in_engine_conflict) on a YAML nested
deeper than PyYAML's recursive composer can read: found by review, a few KiB of '[' raised RecursionError out of the
check (a traceback from `kvsched serve` or a Ray driver's config parse, where an unreadable file is a refusal naming
it). vLLM's own read of such a file dies the same way, so the check refuses it; on a Ray driver (the file read where the
server runs) it is left to the replica, as any unreadable file is. Each case in a child process, as
tests/test_serving_config_file.py runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_serving_config_file import check


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_a_yaml_nested_past_the_readers_recursion_is_refused_naming_the_file(tmp_path: Path, opening: str) -> None:
    (deep := tmp_path / "serve.yaml").write_text("tensor-parallel-size: 2\nx: " + opening * 5000 + "\n")
    assert deep.stat().st_size < 30_000
    refusal = check(deep)
    assert refusal.startswith(f"--config {deep}: worker 'in_engine'") and "nested too deeply" in refusal, refusal
    assert check(deep, "elsewhere") == "None"  # the driver leaves it to the replica, which refuses it (above)
