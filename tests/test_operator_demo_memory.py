"""`kvsched demo` on a host too small for its servers' KV pools: one `kvsched demo: error:` line, exit status 2,
before either server starts, as `kvsched bench agents` (whose `run_benchmark` it calls, and which refuses past the
host's memory: replay_memory.refuse_past_host). Found by review (leftovers68): the demo called `run_benchmark`
without catching that refusal, so it printed a traceback."""

from __future__ import annotations

import pytest

from kvsched.adapters.vllm import tier_host
from kvsched.cli import main


def test_a_demo_past_the_hosts_memory_is_one_line_before_any_server_starts(tmp_path, capsys, monkeypatch) -> None:
    import kvsched.bench.agents as agents

    def started(*_a: object) -> None:
        raise AssertionError("the demo started its servers")

    monkeypatch.setattr(agents, "ensure_tiny_model", lambda size: tmp_path)
    monkeypatch.setattr(agents, "tiny_model_dtype", lambda path: "bfloat16")
    monkeypatch.setattr(agents, "count_tokens", lambda model_dir, workflows: (11_231, 600))
    monkeypatch.setattr(agents, "start_all", started)
    monkeypatch.setattr(tier_host, "host_memory", lambda: (2**20, 2**20))  # a 1 MiB host
    assert main(["demo", "--out", str(tmp_path / "demo.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvsched demo: error: its workload (3 workflow(s), the KV pool oversubscribed 1.5x) "
                          "makes a pool of") and "past this host's" in err, err
    # found by review69: the line began `--pressure 1.5 makes`, an option the demo sets itself and does not take
    assert "--pressure" not in err and err.rstrip().endswith("fewer --workflows or --rounds need less"), err
    assert err.count("\n") == 1, err


def test_a_demo_that_fits_starts_its_servers(tmp_path, monkeypatch) -> None:
    total = 2**40  # a 1 TiB host
    import kvsched.bench.agents as agents

    class Started(Exception):
        pass

    def started(*_a: object) -> None:
        raise Started

    monkeypatch.setattr(agents, "ensure_tiny_model", lambda size: tmp_path)
    monkeypatch.setattr(agents, "tiny_model_dtype", lambda path: "bfloat16")
    monkeypatch.setattr(agents, "count_tokens", lambda model_dir, workflows: (11_231, 600))
    monkeypatch.setattr(agents, "start_all", started)
    monkeypatch.setattr(tier_host, "host_memory", lambda: (total, total))
    with pytest.raises(Started):
        main(["demo", "--out", str(tmp_path / "demo.json")])
