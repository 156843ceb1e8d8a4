"""`kvsched ray-serve --dry-run` (and every start) prints the config's store URL without its secrets: the user part's
password and redis-py's `?password=` / `?ssl_password=` are `***`, as every other line quoting a store URL has them
(redis_store.redacted). Found by review (review68): the `shared store:` line printed the URL as given."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.cli import main


def test_the_dry_runs_store_line_hides_the_urls_passwords(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('store: {url: "rediss://admin:s3cret@10.0.0.5:6379/0?ssl_password=k3y"}\n'
                    "pools:\n  - {name: a, model: kvsched-tiny:test}\n")
    assert main(["ray-serve", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "shared store: rediss://admin:***@10.0.0.5:6379/0?ssl_password=***" in out
    assert "s3cret" not in out and "k3y" not in out
