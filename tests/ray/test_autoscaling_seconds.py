"""The pool's autoscaling settings in seconds (`unscraped_grace_s`, `ttft_hold_s`) are checked alike: a bad value is a
config error naming the setting, a typed error in the core, and `kvsched ray-serve` exits 2 at start-up; a good one
is shown by `--dry-run` with what it does."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvsched.cli import main
from tests.ray.test_autoscaling_window import assert_config_error, assert_core_error

SETTINGS = {  # each setting: a bad value for the start-up check, what `--dry-run` says of it at 15 s
    "unscraped_grace_s": ("-1", "unscraped_grace_s 15s: a replica's engine metrics unread longer are left out"),
    "ttft_hold_s": (".nan", "ttft_hold_s 15s: the last P95 keeps the pool from scaling down that long"),
}
BAD = [(0, "> 0"), (-5, "> 0"), (math.inf, "finite"), (math.nan, "finite"), (True, "valid number"),
       ("60s", "valid number")]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize(("value", "problem"), BAD)
def test_a_bad_value_is_a_config_error_naming_it(setting: str, value: object, problem: str) -> None:
    assert_config_error(setting, value, problem)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("value", [0, -1.0, math.inf, math.nan, True, "60"])
def test_a_bad_value_is_a_typed_error_in_the_core(setting: str, value: object) -> None:
    assert_core_error(setting, value, f"{setting} must be a finite number of seconds > 0")


@pytest.mark.parametrize("setting", SETTINGS)
def test_ray_serve_refuses_a_bad_value_at_start_up(setting: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad, shown = SETTINGS[setting]
    path = tmp_path / "pools.yaml"
    path.write_text(f"pools:\n  - {{name: w, model: /m, autoscaling: {{min_replicas: 1, {setting}: {bad}}}}}\n")
    assert main(["ray-serve", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched ray-serve: pools[0].autoscaling: ") and setting in err, err
    path.write_text(f"pools:\n  - {{name: w, model: /m, autoscaling: {{min_replicas: 1, {setting}: 15}}}}\n")
    assert main(["ray-serve", str(path), "--dry-run"]) == 0
    assert shown in capsys.readouterr().out
