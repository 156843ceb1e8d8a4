"""The shared store's password stays out of logs and error messages (found by review, /tmp/rev_store r6 and r9: vLLM
logs its non-default args, the KVTransferConfig with the store URL among them): `redacted` everywhere, and the URL
travels to the engine in the environment, the KVTransferConfig carrying only its redacted form."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.store.redis_store import StoreConfigError, check_url, redacted  # noqa: E402
from kvsched.adapters.vllm.tier_levels_config import LevelsConfig  # noqa: E402
from kvsched.core.disk_tier import DiskConfigError  # noqa: E402
from tests.adapters.vllm.conftest import unset_env  # noqa: E402

PW = "s3cretpw"
URL = f"redis://:{PW}@127.0.0.1:7/0"
ENV = "KVSCHED_STORE_URL"


@pytest.fixture
def no_store_env(monkeypatch):
    """KVSCHED_STORE_URL unset, and put back as it was afterwards (the parser sets it)."""
    unset_env(monkeypatch, ENV)


@pytest.mark.parametrize("url", [URL, f"redis://user:{PW}@h:6379/0", f"redis://127.0.0.1:6379/0?password={PW}",
                                 f"redis://127.0.0.1:6379/0?db=1&PASSWORD={PW}", f"redis://:{PW}@127.0.0.1:63x9/0",
                                 f"rediss://:{PW}@[::1]:6380/0", f"unix:///tmp/r.sock?password={PW}&db=0"])
def test_redacted_leaves_no_password(url: str) -> None:
    out = redacted(url)
    assert PW not in out and "***" in out


@pytest.mark.parametrize("url", [f"default:{PW}@store:6379", f"redis:default:{PW}@store:6379", f"u:{PW}@h:6379/0"])
def test_a_url_whose_user_part_has_no_slashes_is_hidden_whole_in_errors_too(url: str) -> None:
    """Without `//HOST`, urlsplit sees no user part (a scheme and a path): the password was quoted in check_url's
    error, which the engine logs at start-up (found in review of engine_settings' special case for it)."""
    assert PW not in redacted(url)
    with pytest.raises(StoreConfigError) as err:
        check_url(url)
    assert PW not in str(err.value)


def test_a_url_without_a_password_is_unchanged_and_errors_quote_it_redacted() -> None:
    assert redacted("redis://127.0.0.1:6379/0?db=1") == "redis://127.0.0.1:6379/0?db=1"
    for bad in (f"http://:{PW}@redis.internal:6379", f"redis://:{PW}@127.0.0.1:63x9/0"):
        with pytest.raises(StoreConfigError) as exc:
            check_url(bad)
        assert PW not in str(exc.value) and "***" in str(exc.value)


def test_compaction_logs_an_unusable_url_redacted(monkeypatch, caplog) -> None:
    from kvsched.adapters.vllm.compaction_shared import SharedCheckpoints

    monkeypatch.setenv(ENV, f"redis://:{PW}@127.0.0.1:63x9/0")
    with caplog.at_level(logging.INFO, logger="vllm.kvsched.compaction"):
        assert SharedCheckpoints.from_env() is None
    assert caplog.text and PW not in caplog.text


def test_the_kv_transfer_config_the_cli_builds_holds_no_password(serve_parser, no_store_env) -> None:
    ns = serve_parser.parse_args(["--scheduler", "kvsched", "--kvsched-store-url", URL])
    cfg = ns.kv_transfer_config
    assert PW not in repr(cfg) and PW not in repr(vars(ns)) and PW not in json.dumps(cfg.kv_connector_extra_config)
    assert cfg.kv_connector_extra_config["store_url"] == "redis://:***@127.0.0.1:7/0"
    assert os.environ[ENV] == URL  # the engine core inherits it; the API server's compaction reads it
    assert LevelsConfig.from_extra(cfg.kv_connector_extra_config).store_url == URL  # what the connector connects to


def test_a_url_without_a_password_still_travels_in_the_config(serve_parser, no_store_env) -> None:
    ns = serve_parser.parse_args(["--scheduler", "kvsched", "--kvsched-store-url", "redis://127.0.0.1:7/0"])
    assert ns.kv_transfer_config.kv_connector_extra_config["store_url"] == "redis://127.0.0.1:7/0"
    assert os.environ[ENV] == "redis://127.0.0.1:7/0"


def test_the_flag_wins_over_a_stale_environment(serve_parser, monkeypatch) -> None:
    """The engine connects to the flag's store; the API server's compaction used the environment's (setdefault)."""
    monkeypatch.setenv(ENV, "redis://:other@127.0.0.1:9/0")
    ns = serve_parser.parse_args(["--scheduler", "kvsched", "--kvsched-store-url", URL])
    assert os.environ[ENV] == URL
    assert LevelsConfig.from_extra(ns.kv_transfer_config.kv_connector_extra_config).store_url == URL


def test_a_users_kv_transfer_config_with_a_store_url_still_works(serve_parser, no_store_env) -> None:
    from kvsched.adapters.vllm.tier_config import kv_transfer_config

    user = json.dumps(kv_transfer_config(0.01, store_url=URL))
    ns = serve_parser.parse_args(["--scheduler", "kvsched", "--kv-transfer-config", user])
    extra = ns.kv_transfer_config.kv_connector_extra_config
    assert PW not in repr(ns.kv_transfer_config) and extra["tier_gb"] == 0.01
    assert LevelsConfig.from_extra(extra).store_url == URL
    other = {"kv_connector": "SomeoneElsesConnector", "kv_role": "kv_both",
             "kv_connector_extra_config": {"store_url": "redis://:theirs@h:1/0"}}
    ns = serve_parser.parse_args(["--scheduler", "kvsched", "--kv-transfer-config", json.dumps(other)])
    assert ns.kv_transfer_config.kv_connector_extra_config == other["kv_connector_extra_config"]  # not ours: as is


def test_a_redacted_url_without_its_environment_is_refused_by_name(no_store_env, monkeypatch) -> None:
    with pytest.raises(DiskConfigError, match=f"--kvsched-store-url: .*{ENV}.* not set") as exc:
        LevelsConfig.from_extra({"store_url": "redis://:***@127.0.0.1:7/0"})
    monkeypatch.setenv(ENV, f"redis://:{PW}@10.0.0.1:7/0")
    with pytest.raises(DiskConfigError, match="names another store") as exc:
        LevelsConfig.from_extra({"store_url": "redis://:***@127.0.0.1:7/0"})
    assert PW not in str(exc.value)


def _child_env(queue) -> None:
    queue.put(os.environ.get(ENV))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_engine_processes_inherit_the_url(no_store_env, method: str) -> None:
    """vLLM starts its engine core (and the workers) with multiprocessing, fork by default, spawn when forced
    (vllm.utils.system_utils.get_mp_context): both hand the child the environment the parser set."""
    from kvsched.adapters.vllm.tier_config import hide_store_secret

    hide_store_secret({"store_url": URL})
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_env, args=(queue,))
    proc.start()
    try:
        assert queue.get(timeout=60) == URL
    finally:
        proc.join(30)


@pytest.mark.parametrize(("env", "extra", "policy", "named"), [
    ("nan", {}, "recompute", "KVSCHED_FP8_TIER_GB='nan'"),
    (None, {"tier_gb": -1}, "recompute", "tier_gb"),
    (None, {"tier_gb": 0.01, "disk_gb": "lots"}, "recompute", "kv_connector_extra_config"),
    (None, {"tier_gb": 0.01}, "fail", "kv_load_failure_policy"),
])
def test_a_users_kv_transfer_config_for_the_tier_is_checked_before_the_engine_starts(
        serve_parser, no_store_env, monkeypatch, capsys, env, extra, policy, named) -> None:
    """Found by review: KVSCHED_FP8_TIER_GB=nan with the tier's own --kv-transfer-config passed the parser and failed
    in the engine after the model loaded, without naming the variable."""
    from kvsched.adapters.vllm.tier_config import CONNECTOR_NAME, MODULE_PATH

    if env is not None:
        monkeypatch.setenv("KVSCHED_FP8_TIER_GB", env)
    user = {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH, "kv_role": "kv_both",
            "kv_load_failure_policy": policy, "kv_connector_extra_config": extra}
    with pytest.raises(SystemExit):
        serve_parser.parse_args(["--scheduler", "kvsched", "--kv-transfer-config", json.dumps(user)])
    assert named in capsys.readouterr().err
