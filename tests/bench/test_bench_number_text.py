"""Text that is not a number, given to any number option of any `kvsched` command (every `kvsched bench ...`, `plan`,
`simulate`, `demo` and the rest: each `type=int` and `type=float` option the parser has, found by walking it), is one
`kvsched CMD: error: --flag must be an integer, got 'abc'` line with exit status 2, the form of the range checks'
refusals (tests/bench/test_bench_flag_values.py), before the command runs. Found by review: `kvsched bench sched
--steps abc`, `--sessions x` and agents' `--workflows 1.5` printed argparse's usage line, then `argument --steps:
invalid int value: 'abc'`."""

from __future__ import annotations

import argparse

import pytest

from kvsched.cli import build_parser, main


def number_options(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str,
                                                                                                type]]:
    """(command words, flag, int or float) of every number option, subcommands' included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += number_options(sub, (*path, name))
        elif action.type in (int, float):
            found.append((path, "/".join(action.option_strings), action.type))
    return found


OPTIONS = number_options(build_parser())
TEXT = {int: ["abc", "1.5", "1e3", "", "0x10"], float: ["abc", "", "1,5", "one"]}


def test_every_command_s_number_options_are_found():
    named = {(" ".join(path), flag) for path, flag, _ in OPTIONS}
    assert {("bench sched", "--steps"), ("bench sched", "--sessions"), ("bench agents", "--workflows"),
            ("bench router", "--replicas"), ("bench replay", "--pressure"), ("bench traces", "--timing"),
            ("bench kernels", "--threads"), ("bench compaction", "--growth"), ("plan", "--sessions"),
            ("simulate", "--capacity-blocks"), ("demo", "--workflows"), ("trace import", "--limit")} <= named
    assert len(OPTIONS) >= 79 and all(flag.startswith("--") for _, flag, _ in OPTIONS)


@pytest.mark.parametrize(("path", "flag", "kind"), OPTIONS, ids=[" ".join((*p, f)) for p, f, _ in OPTIONS])
def test_text_for_a_number_option_is_one_error_line_naming_the_flag_and_the_text(path, flag, kind, capsys):
    what = "an integer" if kind is int else "a number"
    for text in TEXT[kind]:
        with pytest.raises(SystemExit) as exit_:
            main([*path, flag, text])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, err
        assert err == f"kvsched {' '.join(path)}: error: {flag} must be {what}, got {text!r}\n"


@pytest.mark.parametrize("argv", [["bench", "router", "--replicas", "8", "x16"], ["bench", "sched", "--sessions", "8",
                                                                                  "--sessions", "many"],
                                  ["simulate", "--workflows", "2", "--pressure", "1.5x"]])
def test_a_bad_value_among_good_ones_is_the_one_named(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"must be {'a number' if '1.5x' in argv else 'an integer'}, got "
                                            f"{argv[-1]!r}\n")


def test_other_parse_errors_stay_argparse_s_own(capsys):
    """An unknown choice keeps argparse's usage line and message (only number text is reworded)."""
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "agents", "--sides", "nope"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: kvsched bench agents") and "unknown side(s)" in err


def test_a_long_text_is_cut_in_the_message(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "sched", "--steps", "x" * 10_000])
    err = capsys.readouterr().err
    assert err == f"kvsched bench sched: error: --steps must be an integer, got {'x' * 40!r}\n"
