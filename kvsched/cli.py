"""The `kvsched` command: one subcommand per module, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Each module defines `register(subparsers) -> None`, adding its parser with `set_defaults(func=...)`;
# `func(args) -> int` is the exit code. Listed explicitly: no registration by import side effects.
COMMAND_MODULES: tuple[str, ...] = (
    "kvsched.commands.tiny_model",
    "kvsched.commands.demo",
    "kvsched.bench",
    "kvsched.commands.plan",
    "kvsched.commands.simulate",
    "kvsched.commands.trace",
    "kvsched.commands.ray_serve",
)


def build_parser() -> argparse.ArgumentParser:
    from kvsched.bench.args import Parser  # (a number option given text: one error line, as a number out of range)

    parser = Parser(prog="kvsched", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module
                raise
            continue  # subcommand not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from kvsched.serving import exit_on_signals

    with exit_on_signals():  # a command's `vllm serve` children are stopped on SIGTERM and SIGHUP too
        return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
