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

# What `pip install .` without an extra leaves out (pyproject.toml's `cpu` and `gpu` extras): a command that
# needs one says so in a line instead of a traceback (found by a fresh venv's user: `kvsched tiny-model` after
# `pip install .` ended in "ModuleNotFoundError: No module named 'torch'").
EXTRA_MODULES = frozenset({"torch", "vllm", "ray", "triton", "matplotlib"})
# The commands that import vLLM or start `vllm serve`: an incomplete CPU install (kvsched/install_check.py) stops them.
NEEDS_VLLM = frozenset({"tiny-model", "demo", "bench"})


def missing_extra(exc: ModuleNotFoundError) -> str | None:
    """The one-line error for a command that imported a module only an extra installs; None for any other. A
    submodule missing from a package that is installed is another version of it, said so (install_check)."""
    top = (exc.name or "").partition(".")[0]
    if top not in EXTRA_MODULES:
        return None
    from kvsched.install_check import version_mismatch

    if (mismatch := version_mismatch(exc.name or "")) is not None:  # the package is there, not that module of it
        return mismatch
    return (f"needs {top}, which kvsched's install without an extra leaves out: in kvsched's clone, `pip install "
            "-e '.[cpu]'` on a CPU machine or `pip install -e '.[gpu]'` with CUDA (README, \"Installing\")")


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
    from kvsched.install_check import IncompleteInstall, vllm_install_problem
    from kvsched.serving import exit_on_signals

    with exit_on_signals():  # a command's `vllm serve` children are stopped on SIGTERM and SIGHUP too
        try:
            if args.command in NEEDS_VLLM and (problem := vllm_install_problem()) is not None:
                raise IncompleteInstall(problem)  # before transformers or a child's `vllm serve` trips on it
            return int(args.func(args) or 0)
        except ModuleNotFoundError as exc:
            if (why := missing_extra(exc)) is None:
                raise
            print(f"kvsched {args.command}: error: {why}", file=sys.stderr)
            return 2
        except IncompleteInstall as exc:
            print(f"kvsched {args.command}: error: {exc}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
