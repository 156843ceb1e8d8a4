"""The plugin asks vLLM to copy kvsched's settings to Ray workers (a worker on another node inherits nothing)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.plugin import RAY_PREFIXES_VAR, carry_settings_to_ray_workers  # noqa: E402


def test_vllms_own_list_of_variables_for_ray_workers_gains_kvsched_settings(monkeypatch) -> None:
    from vllm import envs
    from vllm.ray.ray_env import get_env_vars_to_copy

    envs.disable_envs_cache()  # an engine started in this process froze vLLM's view of the environment (its own tool)
    monkeypatch.delenv(RAY_PREFIXES_VAR, raising=False)
    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "2")
    monkeypatch.setenv("KVSCHED_STORE_URL", "redis://:secret@store:6379/0")
    assert "KVSCHED_FP8_TIER_GB" not in get_env_vars_to_copy()  # vLLM alone leaves them behind
    carry_settings_to_ray_workers()
    copied = get_env_vars_to_copy()
    assert {"KVSCHED_FP8_TIER_GB", "KVSCHED_STORE_URL"} <= copied


def test_registering_the_plugin_carries_them(monkeypatch) -> None:
    from kvsched.adapters.vllm import plugin

    monkeypatch.delenv(RAY_PREFIXES_VAR, raising=False)
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.setattr("kvsched.adapters.vllm.compat.install_parser_hook", lambda: None)
    plugin.register()
    import os

    assert os.environ[RAY_PREFIXES_VAR] == "KVSCHED_"


def test_the_operators_own_prefixes_stay_and_kvsched_is_added_once(monkeypatch) -> None:
    monkeypatch.setenv(RAY_PREFIXES_VAR, "MYCORP_, OTHER_")
    carry_settings_to_ray_workers()
    carry_settings_to_ray_workers()
    import os

    assert os.environ[RAY_PREFIXES_VAR] == "MYCORP_,OTHER_,KVSCHED_"
    monkeypatch.setenv(RAY_PREFIXES_VAR, "KVSCHED_")
    carry_settings_to_ray_workers()
    assert os.environ[RAY_PREFIXES_VAR] == "KVSCHED_"
