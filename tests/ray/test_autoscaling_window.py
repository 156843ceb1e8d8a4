"""The autoscaling look-back window (`autoscaling: {look_back_period_s}`): Ray Serve's `look_back_period_s`, the window
the policy's signals are taken over (the fleet's P95 TTFT merges each replica's bucket counts over it). It was not
settable from kvsched's config: every pool used Ray's 30 s."""

from __future__ import annotations

import math

import pytest

from kvsched.adapters.ray.config import RAY_METRICS_INTERVAL_S, ConfigError, parse_config
from kvsched.core.routing import RoutingConfigError
from kvsched.core.routing_autoscale import AutoscaleTargets


def pool(**autoscaling: object) -> dict[str, object]:
    return {"pools": [{"name": "w", "model": "/m", "autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                                   **autoscaling}}]}


def assert_config_error(setting: str, value: object, problem: str) -> None:
    """A pool's `autoscaling: {setting: value}` is refused at parse, the message naming the setting and `problem`."""
    with pytest.raises(ConfigError) as exc:
        parse_config(pool(**{setting: value}))
    msg = str(exc.value)
    assert msg.startswith("pools[0].autoscaling: ") and setting in msg and problem in msg, msg


def assert_core_error(setting: str, value: object, match: str) -> None:
    """The core's targets refuse `setting=value` with a typed error matching `match`."""
    with pytest.raises(RoutingConfigError, match=match):
        AutoscaleTargets(**{setting: value})  # type: ignore[arg-type]


def test_the_window_reaches_rays_autoscaling_config_and_the_policy() -> None:
    from kvsched.adapters.ray.app import engine_options

    cfg = parse_config(pool(look_back_period_s=45))
    auto = engine_options(cfg.pools[0], cfg)["autoscaling_config"]
    assert auto.look_back_period_s == 45.0 and auto.policy.policy_kwargs["look_back_period_s"] == 45.0
    default = parse_config(pool())
    auto = engine_options(default.pools[0], default)["autoscaling_config"]
    assert auto.look_back_period_s == 30.0  # Ray's own default, as before


def test_kvsched_defaults_match_ray_serves() -> None:
    from ray.serve.config import DEFAULT_METRICS_INTERVAL_S, AutoscalingConfig

    assert RAY_METRICS_INTERVAL_S == DEFAULT_METRICS_INTERVAL_S
    assert AutoscaleTargets().look_back_period_s == AutoscalingConfig.model_fields["look_back_period_s"].default


@pytest.mark.parametrize(("value", "problem"), [
    (0, "> 0"), (-30, "> 0"), (math.inf, "finite"), (math.nan, "finite"), (True, "valid number"),
    ("30s", "valid number"),
    (10, f"> {RAY_METRICS_INTERVAL_S:g} s"), (5.0, f"> {RAY_METRICS_INTERVAL_S:g} s"),
])
def test_a_bad_window_is_a_config_error_naming_it(value: object, problem: str) -> None:
    """A window no longer than Ray's push interval (10 s): Ray only warns (it "will raise an exception in a future
    release"), and the policy would decide on points up to a push old."""
    assert_config_error("look_back_period_s", value, problem)


@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "30"])
def test_a_bad_window_is_a_typed_error_in_the_core(value: object) -> None:
    assert_core_error("look_back_period_s", value, "look_back_period_s")


def test_targets_built_in_code_are_held_to_rays_window_too() -> None:
    with pytest.raises(ConfigError, match="look_back_period_s must be > 10 s"):
        parse_config({"pools": [{"name": "w", "model": "/m", "autoscaling": AutoscaleTargets(look_back_period_s=5)}]})
