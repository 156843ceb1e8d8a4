"""Every `kvsched ...` command the README and docs/*.md show parses with the real argument parser, and every `--flag`
they name exists: in a `kvsched` subcommand, in `vllm serve` (with kvsched's plugin loaded, which adds `--scheduler`
and the `--kvsched-*` flags) or in the short list of other programs' flags the docs quote. A renamed option then fails
here instead of in a reader's terminal."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from kvsched.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Flags the docs quote from other programs: pip, setup.py, `ray start`, benchmarks/store_probe.py, redis-server.
OTHER_PROGRAMS = {"--extra-index-url", "--inplace", "--metrics-export-port", "--only", "--save"}
# Placeholders the docs write in a command, and a value that parses in their place.
PLACEHOLDERS = {"FILE.json": "out.json", "FILE": "trace.jsonl", "TRACE": "trace.jsonl", "IN": "in.jsonl",
                "OUT": "out.jsonl", "FORMAT": "mooncake", "S": "60", "X": "2", "N": "2", "DIR": "d", "G": "1"}


def doc_text() -> str:
    return "\n".join(path.read_text() for path in DOCS)


def doc_commands() -> list[str]:
    """The inline `kvsched ...` spans, each as the command a reader would type (the first of `A|B`, `[opt]` kept)."""
    commands = []
    for span in sorted(set(re.findall(r"`(kvsched [a-z][^`]*)`", doc_text()))):
        if "…" in span:
            continue
        span = re.sub(r"\[([^\[\]|]*)(\|[^\[\]]*)?\]", r"\1", span).replace(" | ", " ")  # [--a X | --b]: the first
        words = [PLACEHOLDERS.get(w, w).split("|")[0] for w in span.split()[1:]]
        commands.append(" ".join(words))
    return commands


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags = set()
    for action in parser._actions:
        flags |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
    return flags


@pytest.mark.parametrize("command", doc_commands())
def test_every_documented_kvsched_command_parses(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A span that names a command in prose (`kvsched trace stats`, `kvsched simulate --compaction`) may leave out
    its arguments or the last option's value; nothing else may fail."""
    try:
        build_parser().parse_args(command.split())
    except SystemExit as exc:
        error = capsys.readouterr().err.strip().splitlines()[-1]
        last = command.split()[-1]
        left_out = "the following arguments are required" in error or (
            last.startswith("--") and f"argument {last}" in error and "expected one argument" in error)
        assert left_out, f"`kvsched {command}` (from the docs) does not parse: exit {exc.code}: {error}"


def test_the_docs_show_the_commands() -> None:
    assert len(doc_commands()) >= 20  # the scan itself found them
    plan = "plan --preset llama-3.1-8b --kv-dtype fp8 --weight-dtype fp8 --context 8192 --sessions 100"
    assert plan in doc_commands()


def test_every_documented_flag_exists() -> None:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    load_general_plugins()  # kvsched's plugin: --scheduler and the --kvsched-* flags
    known = parser_flags(build_parser()) | parser_flags(make_arg_parser(FlexibleArgumentParser())) | OTHER_PROGRAMS
    documented = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w-]*\*)", doc_text()))
    assert {"--scheduler", "--kvsched-fp8-tier-gb", "--pressure-basis"} <= documented
    assert not sorted(documented - known), f"flags the docs name that nothing defines: {sorted(documented - known)}"
