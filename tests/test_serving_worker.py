"""`ServerSpec.worker`: where `vllm serve` runs its model worker. "in_engine" passes `--distributed-executor-backend
uni` and VLLM_ENABLE_V1_MULTIPROCESSING=0 (without the variable vLLM's CPU platform swaps `uni` for `mp`); "default"
passes neither, so `kvsched serve`, the demo and the benchmarks keep vLLM's own layout. A process that writes its
environment stands in for `vllm serve`. The real layouts: tests/integration/test_fp8_tier.py,
tests/ray/test_engine_replica.py and tests/ray/test_serve_integration.py count the processes."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvsched.serving import IN_ENGINE_ARGS, ServerSpec, VllmServer

VAR = "VLLM_ENABLE_V1_MULTIPROCESSING"


def test_in_engine_asks_vllm_for_the_uni_executor_and_default_for_nothing(tmp_path: Path) -> None:
    default = ServerSpec(model=tmp_path, extra_args=["--max-num-seqs", "4"]).argv(8000)
    inside = ServerSpec(model=tmp_path, extra_args=["--max-num-seqs", "4"], worker="in_engine").argv(8000)
    assert "--distributed-executor-backend" not in default and ServerSpec(model=tmp_path).worker_env() == {}
    assert inside == default[:-2] + IN_ENGINE_ARGS + ["--max-num-seqs", "4"]  # the caller's own flags come last
    assert ServerSpec(model=tmp_path, worker="in_engine").worker_env() == {VAR: "0"}


def test_an_unknown_worker_layout_is_a_value_error_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="default, in_engine.*'apart'"):
        ServerSpec(model=tmp_path, worker="apart")  # type: ignore[arg-type]


@dataclass
class EnvSpec(ServerSpec):
    def argv(self, port: int) -> list[str]:
        return [sys.executable, "-c", f"import json, os; print(json.dumps(os.environ.get({VAR!r})))"]


@pytest.mark.parametrize("worker, seen", [("in_engine", "0"), ("default", None)])
def test_the_layouts_variable_reaches_the_server_over_the_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  worker: str, seen: str | None) -> None:
    """In_engine sets it whatever the caller's environment or `env` say (vLLM would run the worker apart); default
    leaves the caller's environment alone (unset here)."""
    monkeypatch.delenv(VAR, raising=False)
    env = {VAR: "1"} if worker == "in_engine" else {}
    spec = EnvSpec(model=tmp_path, worker=worker, env=env)  # type: ignore[arg-type]
    server = VllmServer(spec, log_path=tmp_path / "log")
    server.launch()
    assert server.proc is not None and server.proc.wait(timeout=60) == 0
    assert json.loads(server.log_path.read_text()) == seen


def test_a_ray_pool_passes_its_worker_layout_to_its_replicas_server() -> None:
    pytest.importorskip("ray")
    from kvsched.adapters.ray.config import ConfigError, parse_config
    from kvsched.adapters.ray.engine import server_spec

    pool = {"name": "w", "model": "/m"}
    assert server_spec(parse_config({"pools": [pool]}).pools[0].engine).worker == "default"
    inside = parse_config({"pools": [dict(pool, worker="in_engine")]}).pools[0].engine
    assert server_spec(inside).worker == "in_engine"
    with pytest.raises(ConfigError, match=r"pools\[0\]\.worker"):
        parse_config({"pools": [dict(pool, worker="apart")]})


@pytest.mark.parametrize("args", [["--tensor-parallel-size", "2"], ["-tp", "2"], ["--tensor_parallel_size=4"],
                                  ["-pp=2"], ["--pipeline-parallel-size", "2"], ["-pcp", "2"], ["--tensor-par", "2"],
                                  ["--distributed-executor-backend", "mp"], ["--distributed_executor_backend=ray"]])
def test_in_engine_refuses_the_vllm_arguments_it_cannot_honour(tmp_path: Path, args: list[str]) -> None:
    """Found by review: `worker="in_engine"` with `--tensor-parallel-size 2` started vLLM's uni executor with one
    worker, whose start-up waited for rank 1 until the caller's timeout (180 s here, nothing in the log); another
    executor came after kvsched's `uni` and won, running the worker apart. Both are refused naming the argument."""
    with pytest.raises(ValueError, match=f"{args[0]}.*in_engine.*'default'"):
        ServerSpec(model=tmp_path, worker="in_engine", extra_args=["--max-num-seqs", "4", *args])
    ServerSpec(model=tmp_path, extra_args=args)  # vLLM's own layout: a process a rank, any executor


def test_in_engine_takes_one_rank_and_its_own_executor_spelled_out(tmp_path: Path) -> None:
    ok = ["-tp", "1", "--pipeline-parallel-size=1", "--distributed-executor-backend", "uni", "--max-num-seqs", "2",
          "--tensor-parallel", "1", "--tokenizer", "t", "--data-parallel-size", "1"]
    assert ServerSpec(model=tmp_path, worker="in_engine", extra_args=ok).argv(8000)[-len(ok):] == ok


def test_a_ray_pool_in_engine_with_more_ranks_is_a_config_error_naming_it() -> None:
    pytest.importorskip("ray")
    from kvsched.adapters.ray.config import ConfigError, parse_config

    pool = {"name": "w", "model": "/m", "worker": "in_engine"}
    with pytest.raises(ConfigError, match=r"pools\[0\].*vllm_args -tp 2.*in_engine"):
        parse_config({"pools": [dict(pool, vllm_args=["-tp", 2])]})
    assert parse_config({"pools": [dict(pool, worker="default", vllm_args=["-tp", 2])]}).pools[0].engine.worker == \
        "default"


@pytest.mark.parametrize("yaml_text, cli, named", [
    ("tensor-parallel-size: 2\n", [], "--tensor-parallel-size 2 [(]in --config"),
    ("tensor_parallel_size: 4\n", [], "--tensor_parallel_size 4 [(]in --config"),
    ("pipeline-parallel: 2\n", [], "--pipeline-parallel 2 [(]in --config"),
    ("distributed-executor-backend: mp\n", [], "--distributed-executor-backend mp [(]in --config"),
    ("tensor-parallel-size: 1\n", ["-tp", "2"], "-tp 2: ")])
def test_in_engine_reads_the_options_of_vllms_config_file(tmp_path: Path, yaml_text: str, cli: list[str],
                                                          named: str) -> None:
    """Found by review: vLLM reads `--config FILE.yaml` into its arguments (0.32's FlexibleArgumentParser.
    _pull_args_from_config: each key becomes `--key value`, placed before the command line, which wins), and the
    check did not: a config file's `tensor-parallel-size: 2` passed, to hang the start-up as the flag did."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ValueError, match=f"{named}.*in_engine.*'default'"):
        ServerSpec(model=tmp_path, worker="in_engine", extra_args=["--config", str(config), *cli])
    ServerSpec(model=tmp_path, extra_args=["--config", str(config), *cli])  # vLLM's own layout


@pytest.mark.parametrize("yaml_text, cli", [("tensor-parallel-size: 2\n", ["-tp", "1"]),
                                            ("tensor-parallel-size: 1\nmax-num-seqs: 4\nenforce-eager: true\n", []),
                                            ("distributed-executor-backend: mp\n", ["--distributed-executor-backend",
                                                                                    "uni"])])
def test_in_engine_takes_a_config_file_whose_options_it_honours(tmp_path: Path, yaml_text: str,
                                                                 cli: list[str]) -> None:
    """As vLLM reads them: the command line after the file's options, the last value of an option winning."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml_text)
    ServerSpec(model=tmp_path, worker="in_engine", extra_args=["--config", str(config), *cli])


def test_a_ray_pool_in_engine_reads_its_vllm_args_config_file(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from kvsched.adapters.ray.config import ConfigError, parse_config

    (config := tmp_path / "serve.yaml").write_text("pipeline-parallel-size: 2\n")
    pool = {"name": "w", "model": "/m", "worker": "in_engine", "vllm_args": ["--config", str(config)]}
    with pytest.raises(ConfigError, match=r"pools\[0\].*--pipeline-parallel-size 2 \(in --config .*in_engine"):
        parse_config({"pools": [pool]})


def test_in_engine_refuses_a_config_file_it_cannot_read_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--config .*missing\.yaml.*in_engine.*cannot read"):
        ServerSpec(model=tmp_path, worker="in_engine", extra_args=["--config", str(tmp_path / "missing.yaml")])
