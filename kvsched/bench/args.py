"""Range checks of the commands' numeric options (`kvsched plan`, `simulate`, `demo` and every `kvsched bench ...`):
a number a command cannot use (NaN, inf, negative, 300 digits) is a ValueError naming the flag, which `run` prints as
one `kvsched CMD: error:` line with exit status 2 before anything starts, rather than a traceback or a NaN figure later.
(argparse `type=` would exit from inside the parser, usage text first.)"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvsched.sim.trace_fields import MAX_COUNT  # tokens, blocks or sessions: far past any real figure

MAX_GIB = float(2**30)  # an exbibyte: any memory size past it is a typo
SEED_LIMIT = 2**63  # a seed is a signed 64-bit integer (negative ones are legal): 23 digits is a typo
Limit = Callable[[str, float], None]


def number(low: float = 0.0, high: float = 1e15, low_open: bool = False) -> Limit:
    """A finite number in [low, high] ((low, high] with `low_open`)."""
    def check(flag: str, value: float) -> None:
        if not (low < value if low_open else low <= value) or not value <= high:
            raise ValueError(f"{flag} must be a finite number {'>' if low_open else '>='} {low:.10g} and "
                             f"<= {high:.10g}, got {value}")
    return check


def count(low: int = 0, high: int = MAX_COUNT) -> Limit:
    """An integer in [low, high]."""
    def check(flag: str, value: float) -> None:
        if not low <= value <= high:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ValueError(f"{flag} must be {what} and <= {high}, got {str(value)[:40]}")
    return check


def seed() -> Limit:
    """A seed: any signed 64-bit integer."""
    return count(-SEED_LIMIT, SEED_LIMIT - 1)


def check_args(args: argparse.Namespace, **limits: Limit) -> None:
    """Apply each option's limit (options left unset, None, are skipped; a repeatable or nargs option's list is
    checked value by value)."""
    for dest, limit in limits.items():
        value = getattr(args, dest)
        for one in value if isinstance(value, list | tuple) else () if value is None else (value,):
            limit("--" + dest.replace("_", "-"), one)


def check_out_path(flag: str, path: Path | None, inputs: tuple[Path, ...] = ()) -> None:
    """An output file, before the run: not a directory nor an input (`check_out`), and creatable (an --out of
    `kvsched bench` under a file, in /proc or in a read-only directory was found only once the run was over). Its
    directory is made when the result is written (`write_json`); here the nearest existing one must take a file."""
    from kvsched.sim.out_file import check_out

    if path is None:
        return
    try:
        check_out(path, inputs)
    except ValueError as exc:
        raise ValueError(f"{flag} {exc}") from None
    if path.exists() and not path.is_file():
        return  # a stream (/dev/stdout): written as it is
    _creatable(flag, path, path.absolute().parent)


def check_out_dir(flag: str, path: Path | None) -> None:
    """An output directory, before the run: one, or made where a new file can be made."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} exists and is not a directory")
    _creatable(flag, path, path.absolute())


def _creatable(flag: str, path: Path, parent: Path) -> None:
    """The nearest existing directory at or above `parent` takes a new file (the missing ones are made later)."""
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot make a file in {parent} ({exc.strerror or exc})") from None


class NotANumber(argparse.ArgumentTypeError):
    """Text given to a `type=int` or `type=float` option of a `Parser`."""

    def __init__(self, text: str, what: str) -> None:
        super().__init__(f"must be {what}, got {text[:40]!r}")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise NotANumber(text, "an integer") from None


def _real(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise NotANumber(text, "a number") from None


class Parser(argparse.ArgumentParser):
    """The `kvsched` command's parser, and so every subcommand's (`cli.build_parser`; a subparser takes its parent's
    class): text that is not a number, given to any `type=int` or `type=float` option, is refused as the checks above
    refuse a number, one `PROG: error: --flag must be an integer, got 'abc'` line with exit status 2. Found by review:
    argparse printed its usage line first, then `argument --steps: invalid int value: 'abc'`. Other parse errors are
    argparse's own."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"exit_on_error": False, **kwargs})  # parse_known_args reports its errors
        self.register("type", int, _integer)  # (argument groups convert through their parser's registry)
        self.register("type", float, _real)
        # A value starting with "-" is an option's name to argparse unless it reads as a negative number, and 3.11
        # reads only -5 and -.5 so: -1e-3, -inf or -1_000 was "argument --x: expected one argument" after the usage
        # line (found by review69). Python 3.13's reading (r"-\.?\d": a digit after the sign), and -inf, -nan: no
        # kvsched option's name starts so, so it is a value, and a number option's checks judge it.
        self._negative_number_matcher = re.compile(r"^-(?:\.?\d|inf(?:inity)?$|nan$)", re.IGNORECASE)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        try:
            return super().parse_known_args(args, namespace)
        except argparse.ArgumentError as exc:
            if isinstance(exc.__context__, NotANumber):
                self.exit(2, f"{self.prog}: error: {exc.argument_name} {exc.message}\n")
            self.error(str(exc))


def refuse(prog: str, exc: Exception) -> int:
    """A refused option: one `PROG: error: ...` line on stderr, exit status 2 (as argparse's own)."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


def only_apply(given: Sequence[str], where: str) -> str:
    """The refusal of options `given` outside `where`: "--a only applies with ...", "--a, --b only apply with ..."
    (found by review: one option read "only apply")."""
    return f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} {where}"


def only_with(args: argparse.Namespace, switch: str, defaults: dict[str, float]) -> None:
    """Options that apply only with the flag `switch`: refused when given without it (found by review: accepted, and
    nothing they size was computed), their defaults (None in the parser: not given) filled in with it."""
    if not getattr(args, switch):
        if given := ["--" + d.replace("_", "-") for d in defaults if getattr(args, d) is not None]:
            raise ValueError(only_apply(given, f"with --{switch.replace('_', '-')}"))
        return
    for dest, default in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, default)
