"""`worker: in_engine` with a `--config FILE` among a pool's vllm_args, on Ray: the file's path is one on the replicas'
machines. Found by review: the driver's check of the config read it, so a file only the replicas' machines held was
refused there ("cannot read it") and the pool could not be deployed at all. Now the driver checks the command line
(whose options win over the file's) and a file it can read; each replica checks the file where it is, before its
engine starts, and refuses options it cannot honour naming the pool and the option. Here the "replicas' machine" is
this one after the driver's check: the file is written once the config has been parsed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")
from kvsched.adapters.ray.config import ConfigError, parse_config  # noqa: E402

RANKS = "tensor-parallel-size: 2\n"  # the uni executor's one worker would wait for rank 1 for ever


def pool(config: Path, *cli: str) -> dict[str, Any]:
    return {"name": "w", "model": "/models/on-the-replicas", "worker": "in_engine",
            "vllm_args": ["--config", str(config), *cli]}


def test_the_driver_leaves_a_config_file_it_cannot_read_to_the_replicas(tmp_path: Path) -> None:
    absent = tmp_path / "replicas-only" / "serve.yaml"
    engine = parse_config({"pools": [pool(absent)]}).pools[0].engine
    assert engine.vllm_args == ["--config", str(absent)] and engine.worker == "in_engine"
    with pytest.raises(ConfigError, match=r"pools\[0\].*vllm_args -tp 2: worker 'in_engine'"):  # the command line
        parse_config({"pools": [pool(absent, "-tp", "2")]})
    (readable := tmp_path / "here.yaml").write_text(RANKS)  # one it can read: checked at once, as before
    with pytest.raises(ConfigError, match=r"--tensor-parallel-size 2 \(in --config .*here\.yaml\)"):
        parse_config({"pools": [pool(readable)]})


def test_the_replica_checks_the_file_where_it_is_before_its_engine_starts(tmp_path: Path) -> None:
    from kvsched.adapters.ray.engine import EngineReplica, replica_spec

    config = tmp_path / "serve.yaml"
    engine = parse_config({"pools": [pool(config)]}).pools[0].engine.model_dump()  # as it travels to the replicas
    with pytest.raises(ConfigError, match=r"pool w, on this replica's machine: --config .*serve\.yaml: .*cannot read"):
        replica_spec("w", engine)  # not on this machine either
    config.write_text(RANKS)
    with pytest.raises(ConfigError, match=r"pool w, on this replica's machine: .*--tensor-parallel-size 2 \(in "
                                          r"--config .*serve\.yaml\): worker 'in_engine' runs one model worker"):
        replica_spec("w", engine)
    with pytest.raises(ConfigError, match=r"pool w, on this replica's machine: .*--tensor-parallel-size 2"):
        EngineReplica("w", engine)  # the deployment's constructor: refused before any `vllm serve` starts
    config.write_text("tensor-parallel-size: 1\nmax-num-seqs: 4\n")
    cfg, spec = replica_spec("w", engine)
    assert spec.worker == "in_engine" and spec.extra_args == ["--config", str(config)] and cfg.worker == "in_engine"


def test_a_deployment_whose_replicas_file_asks_for_more_ranks_fails_naming_it(serve_cluster: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    """On a real cluster (loopback): the config passes the driver, and Serve reports the replicas' refusal."""
    from ray import serve

    from kvsched.adapters.ray.app import build_app
    from tests.ray.shared_cluster import delete_app, start_app, wait_running

    config = tmp_path / "serve.yaml"
    cfg = parse_config({"http": {"host": "127.0.0.1", "port": serve_cluster["port"]},
                        "pools": [dict(pool(config), num_cpus=0)]})
    config.write_text(RANKS)  # on "the replicas' machine" once the driver is done with the config
    name = "in-engine-config"
    try:
        with pytest.raises(RuntimeError, match="DEPLOY_FAILED"):
            wait_running(start_app(build_app(cfg), name, route_prefix="/in-engine-config"), timeout_s=180)
        failed = serve.status().applications[name].deployments["engine-w"]
        assert re.search(r"pool w, on this replica's machine: .*--tensor-parallel-size 2 \(in --config .*serve\.yaml\)"
                         r": worker 'in_engine' runs one model worker", failed.message), failed.message
    finally:
        delete_app(name)
