"""`kvsched demo` hands `kvsched bench agents` a complete set of options (every one the benchmark's parser defines)."""

from __future__ import annotations

import argparse

from kvsched.bench import agents
from kvsched.commands.demo import bench_args


def agents_dests() -> set[str]:
    parser = argparse.ArgumentParser()
    agents.register(parser.add_subparsers(dest="bench"))
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["agents"]
    return {a.dest for a in sub._actions if a.dest != "help"}


def test_demo_passes_every_option_the_agents_benchmark_reads() -> None:
    got = bench_args(argparse.Namespace(workflows=2, no_progress=True))
    missing = agents_dests() - set(vars(got))
    assert not missing, f"demo leaves out {missing}"
    assert got.sides == ["stock", "kvsched"] and got.quick and got.workflows == 2 and got.no_progress
    assert got.fidelity_probes == 0 and got.fp8_tier_gb is None
    assert agents.workload_config(got).workflows == 2  # the workload the benchmark will build reads them
