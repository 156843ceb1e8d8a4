"""`kvsched bench …`: one module per benchmark question, each exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

BENCH_MODULES: tuple[str, ...] = (
    "kvsched.bench.agents",
    "kvsched.bench.sched",
    "kvsched.bench.kernels",
    "kvsched.bench.compaction",
    "kvsched.bench.router",
    "kvsched.bench.traces",
    "kvsched.bench.trace_engine",
)


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser("bench", help="benchmarks against stock vLLM / the torch reference")
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
