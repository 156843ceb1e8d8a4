"""The FP8 tier without vLLM's prefix caching (it is keyed by its block hashes). Found by review: `vllm serve
--scheduler kvsched --no-enable-prefix-caching` turned the default tier on, and its connector raised in the worker
after the model had loaded, so the engine died; vLLM also turns prefix caching off by itself (MLA on CPU, non-causal
attention, encoder-only models). Now: the connector serves without the tier, saying why once; the command line leaves
the default tier off with a warning, and refuses in one line a tier (or a level under it) asked for by flag, variable
or --kv-transfer-config."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

pytest.importorskip("vllm")

from tests.adapters.vllm.conftest import sched  # noqa: E402


@pytest.fixture(autouse=True)
def _no_kvsched_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("KVSCHED_")]:
        monkeypatch.delenv(var)


def test_the_connector_serves_without_the_tier_when_prefix_caching_is_off(harness_cfg, caplog) -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector, kv_transfer_config

    cfg = replace(harness_cfg, kv_transfer_config=kv_transfer_config(1), prefix_caching=False)
    with caplog.at_level("INFO", logger="vllm.kvsched.fp8_tier"):
        s = sched(cfg)  # the scheduler side: raised TierConfigError before
    lines = [r.getMessage() for r in caplog.records if "kvsched FP8 tier" in r.getMessage()]
    assert s.kvsched.tier is not None and not s.kvsched.tier.enabled
    assert len(lines) == 1 and "disabled" in lines[0] and "prefix caching is off" in lines[0], lines
    worker = KVSchedFP8TierConnector(s.vllm_config, KVConnectorRole.WORKER, s.kv_cache_config)
    worker.register_kv_caches({})  # nothing to hold: no store, no error
    assert worker.store is None and not worker.enabled


def parse(serve_parser, *argv: str):
    return serve_parser.parse_args(["--scheduler", "kvsched", *argv])


def test_the_default_tier_is_left_off_with_a_warning(serve_parser, capsys) -> None:
    assert parse(serve_parser).kv_transfer_config is not None  # prefix caching left to vLLM: the tier is on
    capsys.readouterr()
    ns = parse(serve_parser, "--no-enable-prefix-caching")
    assert ns.kv_transfer_config is None and ns.enable_prefix_caching is False
    err = capsys.readouterr().err
    assert "kvsched: warning: --no-enable-prefix-caching: kvsched's FP8 tier is off" in err, err
    assert parse(serve_parser, "--no-enable-prefix-caching", "--kvsched-fp8-tier-gb", "0").kv_transfer_config is None
    assert "warning" not in capsys.readouterr().err  # the tier was turned off by its own setting too: nothing to say


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["--kvsched-fp8-tier-gb", "1"], {}, "--kvsched-fp8-tier-gb 1 "),
    (["--kvsched-fp8-tier-gb", "auto"], {}, "--kvsched-fp8-tier-gb auto "),
    ([], {"KVSCHED_FP8_TIER_GB": "1"}, "KVSCHED_FP8_TIER_GB='1' "),
    (["--kvsched-disk-tier-dir", "{tmp}"], {}, "--kvsched-disk-tier-dir "),
    ([], {"KVSCHED_DISK_TIER_DIR": "{tmp}"}, "KVSCHED_DISK_TIER_DIR "),
    (["--kv-transfer-config", json.dumps({"kv_connector": "KVSchedFP8TierConnector", "kv_role": "kv_both",
                                          "kv_connector_module_path": "kvsched.adapters.vllm.fp8_tier_connector"})],
     {}, "--kv-transfer-config naming KVSchedFP8TierConnector "),
])
def test_a_tier_asked_for_is_refused_in_one_line_naming_both(serve_parser, capsys, monkeypatch, tmp_path, argv, env,
                                                             named) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value.replace("{tmp}", str(tmp_path)))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        parse(serve_parser, *[a.replace("{tmp}", str(tmp_path)) for a in argv], "--no-enable-prefix-caching")
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"kvsched: {named}") and "--no-enable-prefix-caching" in err[0], err
