"""`--kvsched-disk-tier-dir/-gb` and `--kvsched-store-url` on vLLM's parser: into the tier's kv_transfer_config, bad
values refused with the flag named."""

from __future__ import annotations

import argparse
import os

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--scheduler-cls", dest="scheduler_cls", default=None)
    p.add_argument("--middleware", action="append", default=[])
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--kv-transfer-config", dest="kv_transfer_config", default=None)
    compat.extend_engine_parser(p)
    return p


def test_the_levels_reach_the_tier_connector(tmp_path, monkeypatch) -> None:
    # set, then removed: monkeypatch restores it (unset) afterwards, so the URL the parser sets does not leak into the
    # servers later tests start (a delenv of an unset variable records nothing to undo)
    monkeypatch.setenv("KVSCHED_STORE_URL", "")
    monkeypatch.delenv("KVSCHED_STORE_URL")
    ns = parser().parse_args(["--scheduler", "kvsched", "--kvsched-disk-tier-dir", str(tmp_path),
                              "--kvsched-disk-tier-gb", "2", "--kvsched-store-url", "redis://127.0.0.1:7/0"])
    extra = ns.kv_transfer_config.kv_connector_extra_config
    assert extra["disk_dir"] == str(tmp_path) and extra["disk_gb"] == "2"
    assert extra["store_url"] == "redis://127.0.0.1:7/0"
    assert os.environ["KVSCHED_STORE_URL"] == "redis://127.0.0.1:7/0"  # the API server's compaction reads it
    assert not hasattr(ns, compat.LEVELS_DEST)  # vLLM never sees kvsched's own options


@pytest.mark.parametrize(("argv", "message"), [
    (["--kvsched-disk-tier-gb", "2"], "needs --kvsched-disk-tier-dir"),
    (["--kvsched-disk-tier-dir", "/tmp/x", "--kvsched-disk-tier-gb", "lots"], "GiB"),
    (["--kvsched-store-url", "http://x"], "redis://"),
    (["--kvsched-disk-tier-dir", "/tmp/x", "--kvsched-fp8-tier-gb", "0"], "need it on"),
])
def test_bad_levels_are_refused_at_the_command_line(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--scheduler", "kvsched", *argv])
    assert message in capsys.readouterr().err


def test_the_levels_need_kvsched(capsys) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["--kvsched-disk-tier-dir", "/tmp/x"])
    assert "need --scheduler kvsched" in capsys.readouterr().err


def test_a_disk_directory_that_is_a_file_is_refused_at_the_command_line(tmp_path, capsys) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    with pytest.raises(SystemExit):
        parser().parse_args(["--scheduler", "kvsched", "--kvsched-disk-tier-dir", str(afile)])
    assert "--kvsched-disk-tier-dir: " in capsys.readouterr().err


def test_a_disk_level_larger_than_its_file_system_is_refused(tmp_path, monkeypatch, capsys) -> None:
    """Found by review: `--kvsched-disk-tier-gb 1e300` was accepted. The directory need not exist yet: its nearest
    existing parent's file system counts."""
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig, file_system_bytes
    from kvsched.core.disk_tier import DiskConfigError

    new_dir = tmp_path / "not" / "yet"
    total = file_system_bytes(str(new_dir))
    assert total and total == file_system_bytes(str(tmp_path))
    with pytest.raises(SystemExit):
        parser().parse_args(["--scheduler", "kvsched", "--kvsched-disk-tier-dir", str(new_dir),
                             "--kvsched-disk-tier-gb", "1e300"])
    assert "--kvsched-disk-tier-gb: 1e+300 GiB is more than the whole file system" in capsys.readouterr().err
    monkeypatch.setenv("KVSCHED_DISK_TIER_DIR", str(new_dir))
    monkeypatch.setenv("KVSCHED_DISK_TIER_GB", str(2 * total / 2**30))
    with pytest.raises(DiskConfigError, match="^KVSCHED_DISK_TIER_GB: .* GiB is more than the whole file system"):
        LevelsConfig.from_extra({}, check_file_system=True)
    monkeypatch.setenv("KVSCHED_DISK_TIER_GB", str(total / 2**30))  # all of it: a size, if an unwise one
    assert LevelsConfig.from_extra({}, check_file_system=True).disk_gb == total / 2**30


def test_an_engine_side_disk_level_is_capped_to_its_file_system_not_refused(tmp_path, monkeypatch, caplog) -> None:
    """Found by review: the file-system check ran wherever the levels' settings are read, the tier connector in the
    engine core and workers included, so a worker on another node with a smaller file system than the API server's
    raised after the model had loaded. There (no check_file_system) the level is capped and the cap logged."""
    import logging

    from kvsched.adapters.vllm import tier_levels_config
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig

    monkeypatch.setattr(tier_levels_config, "file_system_bytes", lambda path: 50 * 2**30)  # this host: 50 GiB
    extra = {"disk_dir": str(tmp_path / "kv"), "disk_gb": 200}
    with caplog.at_level(logging.WARNING, logger="vllm.kvsched.fp8_tier"):
        assert LevelsConfig.from_extra(extra).disk_gb == 50.0
    assert "200 GiB is more than the whole file system" in caplog.text and "capped to 50.0 GiB" in caplog.text
    assert LevelsConfig.from_extra({**extra, "disk_gb": 20}).disk_gb == 20.0  # a size that fits is kept
