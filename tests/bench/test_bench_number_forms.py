"""The forms of a number the commands' number options read (review69): NaN and infinities (refused by the range
checks naming the flag), `1e3` for an integer (refused as text: one line), negative zero, underscores (`1_000`) and a
leading `+` (Python's own number syntax: read as the number), and a negative number argparse took for an option's name.
Found by review69: `-1e-3`, `-inf`, `-nan` and `-1_000` (a digit after the sign, but not argparse 3.11's -5 or -.5)
were `argument --x: expected one argument` after the usage line, for every number option of every command; now the
value is read, and judged by the option's checks as any other."""

from __future__ import annotations

import math

import pytest

from kvsched.cli import build_parser, main
from tests.bench.test_bench_number_text import OPTIONS

NEGATIVE = {int: ["-1e3", "-inf", "-nan", "-1.5"], float: []}
NEGATIVE_VALUES = {"-1e-3": -0.001, "-inf": -math.inf, "-Infinity": -math.inf, "-1_000": -1000.0, "-2E+2": -200.0}


@pytest.mark.parametrize(("path", "flag", "kind"), OPTIONS, ids=[" ".join((*p, f)) for p, f, _ in OPTIONS])
def test_a_negative_number_in_any_form_is_the_options_value_not_an_options_name(path, flag, kind, capsys):
    for text in NEGATIVE[kind]:  # not an integer: the one-line refusal of text
        with pytest.raises(SystemExit) as exit_:
            main([*path, flag, text])
        err = capsys.readouterr().err
        assert (exit_.value.code, err) == (2, f"kvsched {' '.join(path)}: error: {flag} must be an integer, got "
                                              f"{text!r}\n")
    for text, value in NEGATIVE_VALUES.items() if kind is float else ():
        got = parsed(path, flag, text, capsys)
        if isinstance(got, str):  # another argument's own complaint (a required one): not about this value
            assert "expected one argument" not in got and flag not in got, (text, got)
        else:
            assert got == value, text
    got = parsed(path, flag, "-nan", capsys) if kind is float else math.nan
    assert isinstance(got, str) or math.isnan(got)


def parsed(path: tuple[str, ...], flag: str, text: str, capsys: pytest.CaptureFixture[str]) -> float | str:
    """The option's value parsed (a command's run may start servers, so it is not run), or the parse error's line."""
    try:
        args, _ = build_parser().parse_known_args([*path, flag, text])
    except SystemExit:
        return capsys.readouterr().err.splitlines()[-1]
    value = getattr(args, flag[2:].replace("-", "_"))
    return value[-1] if isinstance(value, list) else value


@pytest.mark.parametrize(("argv", "line"), [
    (["plan", "--overhead", "-1e-9"], "--overhead must be a finite number >= 0 and <= 1, got -1e-09"),
    (["plan", "--overhead", "nan"], "--overhead must be a finite number >= 0 and <= 1, got nan"),
    (["plan", "--ceiling", "inf"], "--ceiling must be a finite number > 0 and <= 1, got inf"),
    (["plan", "--ceiling", "-0.0"], "--ceiling must be a finite number > 0 and <= 1, got -0.0"),
    (["plan", "--sessions", "1e3"], "--sessions must be an integer, got '1e3'"),
    (["plan", "--sessions", "-1_000"], "--sessions must be a positive integer and <= 1000000000, got -1000"),
    (["plan", "--context-p50", "-0"], "--context-p50 must be a positive integer and <= 1073741824, got 0"),
    (["simulate", "--generate", "--pressure", "-inf"], "--pressure must be a finite number > 0 and <= 1000000000, "
                                                       "got -inf"),
])
def test_the_range_checks_judge_every_form_in_one_line(argv, line, capsys):
    code = None
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert (code, capsys.readouterr().err) == (2, f"kvsched {argv[0]}: error: {line}\n")


def test_underscores_a_plus_sign_spaces_and_negative_zero_read_as_the_number():
    args = build_parser().parse_args(["plan", "--sessions", "1_000", "--context", "+8192", "--agents", " 3 ",
                                      "--overhead", "-0", "--api-price", "+1_0.5e-1"])
    assert (args.sessions, args.context, args.agents, args.overhead, args.api_price) == (1000, 8192, 3, 0.0, 1.05)
