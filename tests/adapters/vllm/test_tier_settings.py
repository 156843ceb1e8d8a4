"""The FP8 tier's kv_connector_extra_config settings, read as the engine reads them and checked as `vllm serve` checks
them before an engine starts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from tests.adapters.vllm.conftest import sched  # noqa: E402


@pytest.mark.parametrize(("given", "on"), [
    ("false", False), ("0", False), ("off", False), (" No ", False), (False, False), (0, False),
    ("true", True), ("1", True), ("yes", True), (True, True), (1, True), (None, True), ("", True),
])
def test_measure_error_is_read_as_a_boolean(given, on) -> None:
    """Found by review: read with bool(), so "false" and "0" in --kv-transfer-config left it on."""
    from kvsched.adapters.vllm.tier_config import measure_error_of

    assert measure_error_of({} if given is None else {"measure_error": given}) is on


@pytest.mark.parametrize("given", ["maybe", 2, 0.0, [], "tru"])
def test_a_measure_error_that_is_no_boolean_is_refused_naming_the_key(given) -> None:
    from kvsched.adapters.vllm.tier_config import measure_error_of
    from kvsched.core.tier_config import TierConfigError

    with pytest.raises(TierConfigError, match="kv_connector_extra_config.measure_error"):
        measure_error_of({"measure_error": given})


def test_the_connector_turns_measure_error_off_for_false_as_a_string(harness_cfg) -> None:
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config

    ktc = kv_transfer_config(0.001)
    ktc["kv_connector_extra_config"]["measure_error"] = "false"
    assert sched(replace(harness_cfg, kv_transfer_config=ktc)).connector.measure_error is False


def test_vllm_serve_refuses_a_measure_error_that_is_no_boolean(serve_parser, monkeypatch, capsys) -> None:
    from kvsched.adapters.vllm.tier_config import CONNECTOR_NAME, MODULE_PATH

    monkeypatch.delenv("KVSCHED_FP8_TIER_GB", raising=False)
    user = {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"measure_error": "sometimes"}}
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["--scheduler", "kvsched", "--kv-transfer-config", json.dumps(user)])
    assert "measure_error" in capsys.readouterr().err


@pytest.mark.parametrize("given", ["lots", 0, -1, 1e9, True])
def test_vllm_serve_refuses_a_stage_mb_that_is_no_size_before_an_engine_starts(serve_parser, harness_cfg, monkeypatch,
                                                                               capsys, given) -> None:
    """Found by review: the parser checked a --kv-transfer-config's tier_gb, measure_error and levels, not its
    stage_mb, which the connector refuses (TierConfigError) as the engine starts: the engine died after the model
    loaded, inside vLLM's tracebacks, as a bad tier_gb did before the parser checked it."""
    from kvsched.adapters.vllm.fp8_tier_connector import kv_transfer_config
    from kvsched.adapters.vllm.tier_config import CONNECTOR_NAME, MODULE_PATH
    from kvsched.core.tier_config import TierConfigError

    monkeypatch.delenv("KVSCHED_FP8_TIER_GB", raising=False)
    monkeypatch.delenv("KVSCHED_TIER_STAGE_MB", raising=False)
    ktc = kv_transfer_config(0.001)
    ktc["kv_connector_extra_config"]["stage_mb"] = given
    with pytest.raises(TierConfigError, match="stage_mb"):  # what the engine met
        sched(replace(harness_cfg, kv_transfer_config=ktc))
    user = {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH, "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"stage_mb": given}}
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["--scheduler", "kvsched", "--kv-transfer-config", json.dumps(user)])
    assert "kv_connector_extra_config.stage_mb" in capsys.readouterr().err
    user["kv_connector_extra_config"] = {"stage_mb": 0.5}
    serve_parser.parse_args(["--scheduler", "kvsched", "--kv-transfer-config", json.dumps(user)])
