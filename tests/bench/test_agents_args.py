"""`kvsched bench agents` argument handling (no server started)."""

import argparse

import pytest

from kvsched.bench.agents import attainable, parse_sides
from kvsched.cli import build_parser


def test_sides_are_validated_and_deduplicated():
    assert parse_sides("stock, kvsched,stock") == ["stock", "kvsched"]
    with pytest.raises(argparse.ArgumentTypeError, match="bogus"):
        parse_sides("stock,bogus")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_sides(" , ")


def test_unknown_side_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "agents", "--sides", "stock,nonsense"])
    assert exc.value.code == 2
    assert "nonsense" in capsys.readouterr().err


def test_workload_shape_options_reach_the_workload():
    from kvsched.bench.agents import workload_config

    args = build_parser().parse_args(["bench", "agents", "--quick", "--worker-turns", "5", "--tool-words", "40",
                                      "--brief-words", "90"])
    cfg = workload_config(args)
    assert (cfg.worker_turns, cfg.tool_words, cfg.brief_words) == (5, 40, 90)


def test_attainable_share_of_the_floor():
    side = lambda n: {"prefill_tokens_computed": n}  # noqa: E731
    b = attainable({"stock": side(1000), "kvsched": side(700), "unbounded": side(400)})
    assert b["floor_over_stock"] == pytest.approx(0.4)
    assert b["kvsched_share_of_attainable_saving"] == pytest.approx(0.5)


def test_attainable_bounds_the_tier_by_the_same_floor():
    side = lambda n: {"prefill_tokens_computed": n}  # noqa: E731
    b = attainable({"stock": side(1000), "kvsched": side(500), "kvsched+fp8tier": side(450), "unbounded": side(400)})
    assert b["floor_over_kvsched"] == pytest.approx(0.8)  # no tier can be below 0.8x kvsched in this run
    assert b["fp8tier_share_of_attainable_saving"] == pytest.approx(550 / 600)
    assert b["fp8tier_over_stock"] == pytest.approx(0.45)
    assert "floor_over_kvsched" not in attainable({"stock": side(1000), "kvsched": side(500), "unbounded": side(400)})


def test_trace_dir_that_is_a_file_is_a_usage_error_before_any_server_starts(tmp_path, capsys):
    not_a_dir = tmp_path / "traces"
    not_a_dir.write_text("x")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["bench", "agents", "--quick", "--trace-dir", str(not_a_dir)])
    assert exc.value.code == 2
    assert "not a directory" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "agents", "--trace-dir", str(tmp_path / "new")])
    assert args.trace_dir == tmp_path / "new"


def test_session_naming_adds_a_kvsched_side_per_naming_and_names_fields():
    from kvsched.bench.agents_naming import parse_namings, session_fields, with_naming_sides

    args = build_parser().parse_args(["bench", "agents", "--quick", "--sides", "stock,kvsched",
                                      "--session-header", "none,prompt_cache_key"])
    assert args.session_header == ["none", "prompt_cache_key"]
    assert with_naming_sides(["stock", "kvsched"], args.session_header) == \
        ["stock", "kvsched", "kvsched:none", "kvsched:prompt_cache_key"]
    assert with_naming_sides(["stock", "kvsched"], parse_namings("header")) == ["stock", "kvsched"]
    assert session_fields("none", "wf/1", "worker", 60.0, True) == ({}, {})
    assert session_fields("prompt_cache_key", "wf/1", "worker", 60.0, True) == ({}, {"prompt_cache_key": "wf/1"})
    headers, body = session_fields("header", "wf/1", "worker", 60.0, True)
    assert headers["X-Session-Id"] == "wf/1" and headers["X-Session-End"] == "1" and body == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "agents", "--session-header", "cookie"])


def test_naming_gate_is_the_share_of_the_header_sides_saving():
    from kvsched.bench.agents_naming import add_naming_gates

    side = lambda n, errors=0: {"prefill_tokens_computed": n, "errors": errors}  # noqa: E731
    result = {"stock": side(1000), "kvsched": side(600), "kvsched:none": side(630),
              "kvsched:prompt_cache_key": side(700, errors=1)}
    add_naming_gates(result)
    assert result["naming_saving_share"] == {"kvsched:none": pytest.approx(0.925),
                                             "kvsched:prompt_cache_key": pytest.approx(0.75)}
    assert result["gates"] == {"kvsched:none_saving_ge_0.9x_header": True,
                               "kvsched:prompt_cache_key_saving_ge_0.9x_header": False}
