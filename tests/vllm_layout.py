"""The one switch for where the tests' vLLM servers run their model worker (kvsched.serving.ServerSpec.worker).

Most run it inside the engine-core process ("in_engine": `--distributed-executor-backend uni` with
VLLM_ENABLE_V1_MULTIPROCESSING=0): a start-up is then two processes importing vLLM one after the other instead of three,
and the suite's time is mostly start-ups (the tiny model's: 14.8 instead of 21.4 CPU-seconds on a 2-core Xeon;
tests/integration and tests/ray 444 s instead of 562 s: BENCHMARKS.md, "Test-suite start-ups"). It is also
kvsched's production layout: vLLM runs the worker in the engine core by default on a GPU with one GPU per engine.

The CPU build's own default, the worker in a process of its own (three processes), stays covered where named
`DEFAULT_LAYOUT`: test_fp8_tier's main tier server (and its tensor-parallel one, which needs a process per rank),
test_demo (`kvsched demo` and `make demo` keep vLLM's default) and test_engine_replica's Ray engine replica. Set
TESTS_VLLM_WORKER=default to run every server of the suite in the three-process layout. Not a KVSCHED_* name: the
servers inherit the tests' environment, and kvsched warns about KVSCHED_* variables it does not read."""

from __future__ import annotations

import os
from typing import cast

from kvsched.serving import WORKERS, Worker

WORKER_ENV = "TESTS_VLLM_WORKER"
IN_ENGINE: Worker = "in_engine"
DEFAULT_LAYOUT: Worker = "default"  # the servers kept in the CPU build's three-process layout (see above)


def worker() -> Worker:
    """The layout of the suite's servers: TESTS_VLLM_WORKER (default or in_engine), else in_engine."""
    value = os.environ.get(WORKER_ENV) or IN_ENGINE
    if value not in WORKERS:
        raise ValueError(f"{WORKER_ENV} must be one of {', '.join(WORKERS)}, got {value!r}")
    return cast(Worker, value)


def process_titles(pgid: int) -> list[str]:
    """The titles of a `vllm serve` process group's live processes (vLLM names its own: VLLM::EngineCore,
    VLLM::Worker...; Python's multiprocessing resource trackers carry their command line), read from /proc."""
    from kvsched.bench.router_real import group_members

    titles = []
    for pid in group_members(pgid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                titles.append(f.read().split(b"\0", 1)[0].decode(errors="replace"))
        except OSError:
            continue
    return titles


def runs_worker_apart(pgid: int) -> bool:
    """Whether the group has a worker process of its own (the three-process layout) besides its engine core."""
    titles = process_titles(pgid)
    assert any(t.startswith("VLLM::EngineCore") for t in titles), titles
    return any(t.startswith("VLLM::Worker") for t in titles)
