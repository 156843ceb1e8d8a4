"""KVSCHED_* variables as `vllm serve --scheduler kvsched` checks them before an engine starts: the same checks as
their flags, the variable named in each message, readers and checks agreeing, and a misspelt name warned about."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.settings_check import (  # noqa: E402
    engine_setting_errors,
    engine_setting_warnings,
    fault_every,
    known_setting_names,
    trace_scores,
)
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig  # noqa: E402
from kvsched.core.disk_tier import DiskConfigError  # noqa: E402
from tests.adapters.vllm.test_compat_levels import parser  # noqa: E402  (vLLM's options kvsched's hook reads)

ROOT = Path(__file__).resolve().parents[3]
GIB = 2**30


@pytest.fixture(autouse=True)
def _no_kvsched_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("KVSCHED_")]:
        monkeypatch.delenv(var)


def refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """stderr of a command line that must exit 2 before an engine starts."""
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["--scheduler", "kvsched", *argv])
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---- 1: KVSCHED_FP8_TIER_GB beyond this host's memory ------------------------------------------------------------
def test_a_tier_size_from_the_environment_is_checked_against_host_memory(monkeypatch, capsys) -> None:
    monkeypatch.setattr("kvsched.adapters.vllm.tier_host.host_memory", lambda: (4 * GIB, 2 * GIB))
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "64")
    err = refused(capsys)
    assert err.startswith("kvsched: KVSCHED_FP8_TIER_GB='64': a tier of 64.0 GiB exceeds") and "--kvsched" not in err
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "1")  # fits: the tier is on at that size
    extra = parser().parse_args(["--scheduler", "kvsched"]).kv_transfer_config.kv_connector_extra_config
    assert extra["tier_gb"] == 1.0


def test_the_tier_log_line_names_the_variable_too(harness_cfg, caplog, monkeypatch) -> None:
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config
    from tests.adapters.vllm.conftest import sched

    with caplog.at_level("INFO", logger="vllm.kvsched.fp8_tier"):
        sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(0.01)))
    lines = [r.getMessage() for r in caplog.records if "kvsched FP8 tier:" in r.getMessage()]
    assert lines and "--kvsched-fp8-tier-gb / KVSCHED_FP8_TIER_GB" in lines[0], lines


def test_a_tier_smaller_than_one_block_says_it_is_off(harness_cfg, caplog) -> None:
    """Found by review: KVSCHED_FP8_TIER_GB=1e-12 passed every check and ran with 0 slots, no word said."""
    from dataclasses import replace

    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config
    from tests.adapters.vllm.conftest import sched

    with caplog.at_level("INFO", logger="vllm.kvsched.fp8_tier"):  # 1e-12 is refused now: under a byte
        s = sched(replace(harness_cfg, kv_transfer_config=kv_transfer_config(1e-9)))
    lines = [r.getMessage() for r in caplog.records if "kvsched FP8 tier" in r.getMessage()]
    assert s.kvsched.tier is not None and not s.kvsched.tier.enabled
    assert len(lines) == 1 and "disabled" in lines[0] and "hold no block" in lines[0], lines


# ---- 2: KVSCHED_TRACE a file the engine cannot open ---------------------------------------------------------------
def test_a_trace_file_the_engine_cannot_open_is_refused(monkeypatch, tmp_path) -> None:
    for path, why in ((tmp_path / "no" / "such" / "t.jsonl", "does not exist"), (tmp_path, "a directory")):
        monkeypatch.setenv("KVSCHED_TRACE", str(path))
        errors = engine_setting_errors()
        assert len(errors) == 1 and errors[0].startswith("KVSCHED_TRACE=") and why in errors[0], errors
    monkeypatch.setenv("KVSCHED_TRACE", str(tmp_path / "t.jsonl"))
    assert engine_setting_errors() == []


# ---- 3: a misspelt KVSCHED_* name ---------------------------------------------------------------------------------
def test_a_misspelt_name_is_a_warning_with_the_known_name(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KVSCHED_PIN_BUDGT", "0.5")
    monkeypatch.setenv("KVSCHED_DEFAULT_TTL_S", "60")  # known: no warning
    assert engine_setting_warnings() == ["KVSCHED_PIN_BUDGT is not a kvsched setting and is ignored; did you mean "
                                         "KVSCHED_PIN_BUDGET_FRACTION?"]
    assert engine_setting_errors() == []
    parser().parse_args(["--scheduler", "kvsched"])  # started: a warning, not an exit
    assert "kvsched: warning: KVSCHED_PIN_BUDGT" in capsys.readouterr().err


def names_read_in_source() -> set[str]:
    """Every KVSCHED_* name in a string of kvsched's source (a literal read, a constant, a docstring's mention), and
    every one the Makefile sets (`make test` runs `vllm serve` with them: a warning there would be noise)."""
    names = set(re.findall(r"\b(KVSCHED_[A-Z0-9_]*[A-Z0-9])=", (ROOT / "Makefile").read_text()))
    for path in [*(ROOT / "kvsched").rglob("*.py"), ROOT / "setup.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names |= set(re.findall(r"\bKVSCHED_[A-Z0-9_]*[A-Z0-9]\b", node.value))
    return names


def test_every_variable_the_source_names_is_a_known_setting() -> None:
    names = names_read_in_source()
    assert len(names) > 20  # the scan found the settings
    missing = sorted(names - known_setting_names())
    assert not missing, f"read in kvsched/ but unknown to the settings check (warned about as misspelt): {missing}"


# ---- 4: the disk level's variables with the tier off --------------------------------------------------------------
@pytest.mark.parametrize("argv", [[], ["--kvsched-fp8-tier-gb", "0"]])
def test_disk_level_variables_with_the_tier_off_are_refused(monkeypatch, capsys, tmp_path, argv) -> None:
    if not argv:
        monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "0")
    monkeypatch.setenv("KVSCHED_DISK_TIER_DIR", str(tmp_path))
    monkeypatch.setenv("KVSCHED_DISK_TIER_GB", "1")
    err = refused(capsys, *argv)
    assert err.startswith("kvsched: KVSCHED_DISK_TIER_DIR / KVSCHED_DISK_TIER_GB: ") and "FP8 tier" in err, err


def test_the_store_url_alone_is_kept_with_the_tier_off(monkeypatch) -> None:
    """The API server's compaction still shares its summaries through it (compaction_shared)."""
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "0")
    monkeypatch.setenv("KVSCHED_STORE_URL", "redis://127.0.0.1:7/0")
    assert parser().parse_args(["--scheduler", "kvsched"]).kv_transfer_config is None


# ---- 5: compaction checkpoints keep KVSCHED_STORE_STATE_TTL_S -----------------------------------------------------
def test_compaction_checkpoints_use_the_state_ttl(monkeypatch) -> None:
    from kvsched.adapters.vllm.compaction_shared import SharedCheckpoints

    monkeypatch.setattr("kvsched.adapters.store.redis_store.open_store", lambda url: object())
    monkeypatch.setenv("KVSCHED_STORE_URL", "redis://127.0.0.1:7/0")
    monkeypatch.setenv("KVSCHED_STORE_STATE_TTL_S", "120")
    shared = SharedCheckpoints.from_env()
    assert shared is not None and shared.ttl_s == 120.0


# ---- 7: KVSCHED_TIER_FAULT_EVERY: the check and the reader agree ------------------------------------------------------
@pytest.mark.parametrize(("raw", "value"), [("", 0), (" ", 0), (" 3 ", 3), ("0", 0)])
def test_fault_every_values_the_check_passes_are_read(monkeypatch, raw, value) -> None:
    monkeypatch.setenv("KVSCHED_TIER_FAULT_EVERY", raw)
    assert engine_setting_errors() == [] and fault_every() == value


@pytest.mark.parametrize("raw", ["²", "٣", "-1", "1.5"])
def test_fault_every_digits_int_refuses_are_refused(monkeypatch, raw) -> None:
    monkeypatch.setenv("KVSCHED_TIER_FAULT_EVERY", raw)
    errors = engine_setting_errors()
    assert len(errors) == 1 and errors[0].startswith("KVSCHED_TIER_FAULT_EVERY="), errors


# ---- 8: KVSCHED_TRACE_SCORES is a boolean ---------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "on"), [("", False), ("0", False), ("off", False), ("no", False), ("1", True),
                                         ("True", True), ("on", True)])
def test_trace_scores_is_read_as_a_boolean(monkeypatch, raw, on) -> None:
    monkeypatch.setenv("KVSCHED_TRACE_SCORES", raw)
    assert trace_scores() is on and engine_setting_errors() == []


def test_a_trace_scores_value_that_is_not_a_boolean_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("KVSCHED_TRACE_SCORES", "maybe")
    errors = engine_setting_errors()
    assert len(errors) == 1 and errors[0].startswith("KVSCHED_TRACE_SCORES='maybe'"), errors


def test_trace_scores_0_leaves_the_scores_out_of_the_trace(harness_cfg, monkeypatch, tmp_path) -> None:
    from kvsched.core.retention_records import Release, ReleaseReason
    from kvsched.core.sessions import SessionKey
    from tests.adapters.vllm.conftest import sched

    rows = []
    for raw in ("0", "1"):
        path = tmp_path / f"trace-{raw}.jsonl"
        monkeypatch.setenv("KVSCHED_TRACE", str(path))
        monkeypatch.setenv("KVSCHED_TRACE_SCORES", raw)
        pins = sched(harness_cfg).kvsched
        pins._write_trace([Release(SessionKey("s"), ReleaseReason.TTL)], None)
        pins._trace.close()
        rows.append(json.loads(path.read_text().splitlines()[-1]))
    assert "scores" not in rows[0] and "scores" in rows[1]


# ---- 9: the disk and store messages name where the value came from ------------------------------------------------
@pytest.mark.parametrize(("env", "extra", "named"), [
    ({"KVSCHED_DISK_TIER_DIR": "/tmp/x", "KVSCHED_DISK_TIER_GB": "lots"}, {}, "KVSCHED_DISK_TIER_GB must be"),
    ({}, {"disk_dir": "/tmp/x", "disk_gb": "lots"}, "--kvsched-disk-tier-gb must be"),
    ({"KVSCHED_DISK_TIER_GB": "2"}, {}, "KVSCHED_DISK_TIER_GB needs"),
    ({}, {"disk_gb": "2"}, "--kvsched-disk-tier-gb needs"),
    ({"KVSCHED_STORE_URL": "http://x"}, {}, "KVSCHED_STORE_URL: "),
    ({}, {"store_url": "http://x"}, "--kvsched-store-url: "),
])
def test_level_errors_name_the_flag_or_the_variable(monkeypatch, env, extra, named) -> None:
    _refused_naming(monkeypatch, env, extra, named)


def _refused_naming(monkeypatch, env, extra, named) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(DiskConfigError) as exc:
        LevelsConfig.from_extra(extra)
    assert str(exc.value).startswith(named), exc.value


# ---- 10: a blank variable is an unset one, for every setting --------------------------------------------------------
def test_every_setting_set_blank_is_its_default(monkeypatch, capsys) -> None:
    """Found by review: KVSCHED_DEFAULT_TTL_S="" failed with Python's own float error and KVSCHED_INFER_SESSIONS="" was
    refused, while the tier's variables read "" as their default (kvsched.core.env)."""
    from kvsched.core.config import RetentionConfig

    for name in known_setting_names():
        monkeypatch.setenv(name, " " if name.endswith("_S") else "")
    assert engine_setting_errors() == [] and engine_setting_warnings() == []
    assert RetentionConfig.from_env() == RetentionConfig()
    ns = parser().parse_args(["--scheduler", "kvsched"])
    assert ns.kv_transfer_config.kv_connector_extra_config["tier_gb"] == "auto" and capsys.readouterr().err == ""


def test_every_setting_set_to_blanks_is_its_default(monkeypatch, capsys, caplog) -> None:
    """Found by review: the disk and store levels read their variables with `or`, so KVSCHED_DISK_TIER_DIR='  ' turned
    the disk level on in a directory named two blanks, KVSCHED_DISK_TIER_GB='  ' and KVSCHED_STORE_URL='  ' were
    refused at start, KVSCHED_REPLICA_NAME='  ' named the engine '  ', and the API server's compaction tried to open a
    store at '  ' (kvsched.core.env: blanks are unset). KVSCHED_COMPACTION_SUMMARY_PREFIX is the one setting whose
    empty value means something (no prefix)."""
    import socket

    from kvsched.adapters.vllm.compaction_shared import SharedCheckpoints
    from kvsched.sim.mooncake import traces_dir
    from kvsched.tiny_model import default_cache_dir

    for name in known_setting_names() - {"KVSCHED_COMPACTION_SUMMARY_PREFIX"}:
        monkeypatch.setenv(name, "  ")
    assert engine_setting_errors() == [] and engine_setting_warnings() == []
    assert LevelsConfig.from_extra({}) == LevelsConfig(replica=f"{socket.gethostname()}/{os.getpid()}")
    ns = parser().parse_args(["--scheduler", "kvsched"])
    assert ns.kv_transfer_config.kv_connector_extra_config["tier_gb"] == "auto" and capsys.readouterr().err == ""
    assert SharedCheckpoints.from_env() is None and "shared store" not in caplog.text
    home = Path.home() / ".cache" / "kvsched"
    assert (default_cache_dir(), traces_dir()) == (home / "models", home / "traces")


@pytest.mark.parametrize(("extra", "env", "named"), [
    ({"kv_ttl_s": 0}, {}, "kv_ttl_s must be"), ({"fetch_mb": True}, {}, "fetch_mb must be a number"),
    ({}, {"KVSCHED_STORE_KV_TTL_S": "0"}, "KVSCHED_STORE_KV_TTL_S must be"),
    ({"state_ttl_s": "x"}, {"KVSCHED_STORE_STATE_TTL_S": "60"}, "state_ttl_s must be"),
])
def test_store_settings_name_where_a_bad_value_came_from(monkeypatch, extra, env, named) -> None:
    """Found by review: a bad kv_ttl_s or fetch_mb in --kv-transfer-config was reported under the variable's name."""
    _refused_naming(monkeypatch, env, extra, named)
