"""kvsched.serving_in_engine.in_engine_conflict against vLLM's own `vllm serve` parser: worker "in_engine" is refused
exactly when the options vLLM would take (a `--config FILE.yaml`'s among them, the command line winning) ask for more
than one rank or for an executor other than `uni`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvsched.serving_in_engine import in_engine_conflict

CASES = [
    ("tensor-parallel-size: 2\n", []), ("tensor_parallel_size: 2\n", ["-tp", "1"]), ("pipeline-parallel: 2\n", []),
    ("prefill-context-parallel-size: 3\nmax-num-seqs: 4\n", []), ("tensor-parallel-size: 1\n", ["-tp", "2"]),
    ("distributed-executor-backend: mp\n", []),
    ("distributed-executor-backend: mp\n", ["--distributed-executor-backend", "uni"]),
    ("distributed_executor_backend: uni\nenforce-eager: true\n", []), ("max-num-seqs: 4\n", ["-pp", "2", "-pp", "1"]),
]


@pytest.mark.parametrize("yaml_text, cli", CASES)
def test_in_engine_refuses_what_vllms_parser_would_take(tmp_path: Path, vllm_cli, yaml_text: str,
                                                         cli: list[str]) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml_text)
    extra = ["--config", str(config), *cli]
    taken = vllm_cli.parse_args(["serve", "MODEL", *extra])
    ranks = (taken.tensor_parallel_size, taken.pipeline_parallel_size, taken.prefill_context_parallel_size)
    wanted = taken.distributed_executor_backend not in (None, "uni") or any(n != 1 for n in ranks)
    assert (in_engine_conflict(extra) is not None) == wanted, (ranks, taken.distributed_executor_backend)


# argparse also takes a single-dash option's unambiguous prefix: `-t 2` is `-tp 2`, `-pc 2` is `-pcp 2` (found by
# review: both passed the check and asked for two ranks).
COMMAND_LINES = [["-t", "2"], ["-pc", "2"], ["-t=2"], ["-t", "1"], ["-pc=1"], ["-tp", "2", "-t", "1"],
                 ["-t", "2", "-tp", "1"], ["--max-num-seqs", "2", "-t", "3"]]


@pytest.mark.parametrize("cli", COMMAND_LINES)
def test_in_engine_refuses_a_short_options_prefix_as_vllm_reads_it(vllm_cli, cli: list[str]) -> None:
    try:
        taken = vllm_cli.parse_args(["serve", "MODEL", *cli])
    except SystemExit:  # vLLM refuses it itself: the check may pass it or refuse it
        return
    ranks = (taken.tensor_parallel_size, taken.pipeline_parallel_size, taken.prefill_context_parallel_size)
    assert (in_engine_conflict(cli) is not None) == any(n != 1 for n in ranks), ranks
