"""With kvsched's scheduler on Ray, the parser asks vLLM to copy kvsched's settings to Ray workers (a worker on another
node inherits nothing); without Ray it leaves vLLM's environment alone (the variable is a compile-cache factor)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm.compat.cli import RAY_PREFIXES_VAR  # noqa: E402
from tests.adapters.vllm.conftest import unset_env  # noqa: E402


@pytest.fixture
def no_prefixes(monkeypatch):
    """The variable unset, and put back as it was afterwards (the parser sets it)."""
    unset_env(monkeypatch, RAY_PREFIXES_VAR)


def test_kvsched_on_ray_workers_gets_its_settings_copied_by_vllm(serve_parser, no_prefixes, monkeypatch) -> None:
    from vllm import envs
    from vllm.ray.ray_env import get_env_vars_to_copy

    monkeypatch.setenv("KVSCHED_FP8_TIER_GB", "2")
    cached = envs._is_envs_cache_enabled()
    envs.disable_envs_cache()  # an engine started in this process froze vLLM's view of the environment
    try:
        assert "KVSCHED_FP8_TIER_GB" not in get_env_vars_to_copy()  # vLLM alone leaves them behind
        serve_parser.parse_args(["--scheduler", "kvsched", "--distributed-executor-backend", "ray"])
        assert os.environ[RAY_PREFIXES_VAR] == "KVSCHED_"
        assert "KVSCHED_FP8_TIER_GB" in get_env_vars_to_copy()
    finally:
        if cached:
            envs.enable_envs_cache()


@pytest.mark.parametrize("argv", [["--scheduler", "kvsched"], ["--distributed-executor-backend", "ray"]])
def test_otherwise_vllms_environment_is_left_alone(serve_parser, no_prefixes, argv) -> None:
    serve_parser.parse_args(argv)
    assert RAY_PREFIXES_VAR not in os.environ


def test_the_operators_own_prefixes_stay_and_kvsched_is_added_once(serve_parser, monkeypatch) -> None:
    monkeypatch.setenv(RAY_PREFIXES_VAR, "MYCORP_, OTHER_")
    for _ in range(2):
        serve_parser.parse_args(["--scheduler", "kvsched", "--data-parallel-backend", "ray"])
    assert os.environ[RAY_PREFIXES_VAR] == "MYCORP_,OTHER_,KVSCHED_"


@pytest.mark.parametrize(("argv", "group", "copied"), [
    (["--tensor-parallel-size", "2"], True, True),  # vLLM picks Ray itself: one process, several workers, in a group
    (["--tensor-parallel-size", "2"], False, False),  # not in a placement group: vLLM picks mp
    ([], True, False),  # one worker: vLLM runs it in the engine process
    (["--tensor-parallel-size", "2", "--distributed-executor-backend", "mp"], True, False),
])
def test_ray_chosen_by_vllm_in_a_placement_group_gets_the_settings_too(serve_parser, no_prefixes, monkeypatch, argv,
                                                                       group, copied) -> None:
    """Found by review: only --distributed-executor-backend / --data-parallel-backend ray were looked at, while vLLM
    (ParallelConfig.__post_init__) picks Ray by itself for several workers inside a Ray placement group."""
    import sys
    import types

    ray, util = types.ModuleType("ray"), types.ModuleType("ray.util")
    ray.is_initialized = lambda: True  # type: ignore[attr-defined]
    util.get_current_placement_group = lambda: object() if group else None  # type: ignore[attr-defined]
    ray.util = util  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.util", util)
    serve_parser.parse_args(["--scheduler", "kvsched", *argv])
    assert (os.environ.get(RAY_PREFIXES_VAR) == "KVSCHED_") is copied
