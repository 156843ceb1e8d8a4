"""`kvsched bench agents` refuses, as `kvsched bench replay` does (replay_memory), a run whose servers would hold more
KV memory than this host has: one `kvsched bench agents: error:` line, exit status 2, before any server starts. Its
sides' servers all start at once (`serving.start_all`) and keep their pools until their side has run; a kvsched
side's FP8 tier fills while it runs. Found by review: it had no such refusal (its sides' pools and tier were never
counted), so a --pressure near 0 or a large --fp8-tier-gb started every server to fail or be killed later."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvsched.adapters.vllm import tier_host
from kvsched.cli import main
from kvsched.tiny_model import SIZES

GIB = 2**30
BLOCK = 32 * SIZES["bench"].kv_bytes_per_token("bfloat16")  # a pool block of the bench model in bf16
TIER_SLOT = 8 * 4 * (32 * 128 + 4)  # 8 layers x 4 KV heads x (32 rows of K and V in FP8 + a scale)


class Started(Exception):
    """The servers would have started."""


@pytest.fixture
def bench(monkeypatch, tmp_path, capsys):
    """`kvsched bench agents --quick ARGV` with the model, its tokenizer's count and the servers faked: (exit status,
    stderr, each side's ServerSpec); `host.total` is this host's memory (64 GiB available)."""
    import kvsched.bench.agents as agents

    monkeypatch.delenv("KVSCHED_FP8_TIER_GB", raising=False)
    monkeypatch.setattr(agents, "ensure_tiny_model", lambda size: tmp_path)
    monkeypatch.setattr(agents, "tiny_model_dtype", lambda path: "bfloat16")
    monkeypatch.setattr(agents, "count_tokens", lambda model_dir, workflows: (11_231, 600))
    host = SimpleNamespace(total=64 * GIB, specs={})

    def start_all(servers):
        host.specs.update({s.spec.served_model_name + str(i): s.spec for i, s in enumerate(servers)})
        raise Started

    monkeypatch.setattr(agents, "start_all", start_all)
    monkeypatch.setattr(tier_host, "host_memory", lambda: (host.total, 64 * GIB))

    def run(*argv: str) -> tuple[int, str]:
        try:
            code = main(["bench", "agents", "--quick", "--no-progress", *argv])
        except Started:
            code = None
        return code, capsys.readouterr().err

    host.run = run
    return host


def pools(pressure: float = 1.5) -> tuple[int, int, int]:
    """(pool, same-memory pool, unbounded pool) in blocks, as run_benchmark sizes them for the faked count."""
    import math

    from kvsched.bench.trace_engine import same_memory_blocks

    n = max(math.ceil(11_231 / pressure / 32), math.ceil((600 + 64) / 32) + 4)
    return n, same_memory_blocks(n), max(n, math.ceil(11_231 * 1.25 / 32))


def test_the_sides_pools_past_the_host_are_refused_before_any_server_starts(bench):
    n, same, unbounded = pools()
    everything = (3 * n + same + unbounded) * BLOCK  # the default sides' pools, all held from the start
    bench.total = everything - 1
    code, err = bench.run()
    assert code == 2 and not bench.specs, err
    assert err.startswith("kvsched bench agents: error: --pressure 1.5 makes a pool of") and err.count("\n") == 1, err
    assert f"{3 * n + same + unbounded} blocks in all (every side's server runs at once)" in err, err
    bench.total = everything + 2 * n * BLOCK  # and the tier side's tier (2x its pool) beside the later sides' pools
    assert bench.run()[0] is None and len(bench.specs) == 5  # started


def test_the_tier_sides_tier_is_counted_as_it_fills(bench):
    n, _, _ = pools()
    tier = 2 * n * BLOCK // TIER_SLOT * TIER_SLOT
    bench.total = n * BLOCK + tier - 1  # the pool fits, not the pool with its tier full
    code, err = bench.run("--sides", "kvsched")
    assert code == 2 and not bench.specs, err
    assert "(while side kvsched runs: " in err and "its FP8 tier full" in err and "auto: " in err, err
    assert bench.run("--sides", "kvsched-no-tier")[0] is None  # no tier: the pool alone fits
    bench.total += 1
    assert bench.run("--sides", "kvsched")[0] is None


def test_a_tier_size_given_is_counted_at_that_size_and_named(bench):
    n, _, _ = pools()
    bench.total = 4 * GIB
    code, err = bench.run("--sides", "stock,kvsched", "--fp8-tier-gb", "4")
    assert code == 2 and not bench.specs and "4 GiB asked)" in err and err.count("\n") == 1, err


def test_the_sweep_is_refused_before_its_first_pressure_starts_a_server(bench):
    n, same, unbounded = pools()
    bench.total = (3 * n + same + unbounded) * BLOCK - 1
    code, err = bench.run("--sweep")
    assert code == 2 and not bench.specs and "--pressure 1.5 makes a pool" in err, err
