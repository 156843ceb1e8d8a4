"""`kvsched bench agents --session-header none,prompt_cache_key`: each naming side (`kvsched:<naming>`) runs kvsched
with the FP8 tier the `kvsched` side runs, so their prefill savings compare the naming alone. Found by review
(leftovers68): `--fp8-tier-gb` was passed to the `kvsched` side only, so the naming sides ran the default-sized tier."""

from __future__ import annotations

import pytest

from kvsched.adapters.vllm import tier_host
from kvsched.cli import main


class Started(Exception):
    """The servers would have started."""


def specs_of(monkeypatch, tmp_path, *argv: str) -> dict[str, object]:
    import kvsched.bench.agents as agents

    monkeypatch.delenv("KVSCHED_FP8_TIER_GB", raising=False)
    monkeypatch.setattr(agents, "ensure_tiny_model", lambda size: tmp_path)
    monkeypatch.setattr(agents, "tiny_model_dtype", lambda path: "bfloat16")
    monkeypatch.setattr(agents, "count_tokens", lambda model_dir, workflows: (11_231, 600))
    monkeypatch.setattr(tier_host, "host_memory", lambda: (2**40, 2**40))
    seen: list[object] = []

    def start_all(servers):
        seen.extend(s.spec for s in servers)
        raise Started

    monkeypatch.setattr(agents, "start_all", start_all)
    with pytest.raises(Started):
        main(["bench", "agents", "--quick", "--no-progress", "--sides", "stock,kvsched", *argv])
    return dict(zip(["stock", "kvsched", "kvsched:none", "kvsched:prompt_cache_key"], seen, strict=True))


def tier_flag(spec) -> list[str]:
    args = list(spec.extra_args)
    return args[args.index("--kvsched-fp8-tier-gb"):][:2] if "--kvsched-fp8-tier-gb" in args else []


def test_the_naming_sides_run_the_tier_size_the_kvsched_side_runs(monkeypatch, tmp_path) -> None:
    specs = specs_of(monkeypatch, tmp_path, "--fp8-tier-gb", "0.5", "--session-header", "header,none,prompt_cache_key")
    assert tier_flag(specs["kvsched"]) == ["--kvsched-fp8-tier-gb", "0.500000"]
    assert tier_flag(specs["kvsched:none"]) == tier_flag(specs["kvsched"])
    assert tier_flag(specs["kvsched:prompt_cache_key"]) == tier_flag(specs["kvsched"])
    assert tier_flag(specs["stock"]) == []


def test_without_a_tier_size_every_kvsched_side_runs_the_engines_default(monkeypatch, tmp_path) -> None:
    specs = specs_of(monkeypatch, tmp_path, "--session-header", "header,none,prompt_cache_key")
    assert [tier_flag(specs[s]) for s in specs] == [[], [], [], []]
