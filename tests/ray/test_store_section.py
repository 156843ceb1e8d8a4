"""The `store:` section of kvsched ray-serve's YAML: validated with the key named, applied to every pool's engines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvsched.adapters.ray.config import ConfigError, parse_config
from kvsched.adapters.ray.store import read_store_section, store_section, with_store

POOLS = [{"name": "a", "model": "kvsched-tiny:test"}, {"name": "b", "model": "kvsched-tiny:test", "models": ["b"],
                                                         "env": {"KVSCHED_STORE_URL": "redis://old:1"}}]


def test_a_store_section_reaches_every_pools_engine_environment() -> None:
    cfg = parse_config({"pools": POOLS, "store": {"url": "redis://10.0.0.5:6379/0", "kv_ttl_s": 600}})
    section = store_section({"url": "redis://10.0.0.5:6379/0", "kv_ttl_s": 600})
    assert section is not None and not section.local
    out = with_store(cfg, section.url, section)
    for pool in out.pools:
        env = dict(pool.engine.env)
        assert env["KVSCHED_STORE_URL"] == "redis://10.0.0.5:6379/0" and env["KVSCHED_STORE_KV_TTL_S"] == "600.0"
        assert list(pool.engine.env).count("KVSCHED_STORE_URL") == 1
    assert store_section(None) is None and store_section({"url": "local"}).local  # type: ignore[union-attr]


@pytest.mark.parametrize(("raw", "message"), [
    ({"url": "http://x"}, "store.url"), ({}, "store.url: Field required"), ({"url": "local", "ttl": 3}, "unknown key"),
    ({"url": "local", "kv_ttl_s": 0}, "store.kv_ttl_s"), ({"url": "local", "maxmemory_mb": True}, "maxmemory_mb"),
    # found by review: an infinite or huge TTL passed, then every write overflowed the store's millisecond TTL
    ({"url": "local", "kv_ttl_s": float("inf")}, "store.kv_ttl_s"), ({"url": "local", "state_ttl_s": 1e300},
                                                                      "store.state_ttl_s"),
    ("redis://x", "store: Input should be a valid dictionary")])
def test_bad_store_sections_name_the_key(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        store_section(raw)


def test_the_config_refuses_a_bad_store_section_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="store.*kv_ttl_s"):
        parse_config({"pools": POOLS, "store": {"url": "local", "kv_ttl_s": -1}})


def test_ray_serve_dry_run_describes_the_store(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("store: {url: local}\npools:\n  - {name: a, model: kvsched-tiny:test}\n")
    assert read_store_section(path) is not None
    r = subprocess.run([sys.executable, "-m", "kvsched.cli", "ray-serve", str(path), "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "shared store: a local redis-server" in r.stdout
    path.write_text("store: {url: ftp://x}\npools:\n  - {name: a, model: kvsched-tiny:test}\n")
    r = subprocess.run([sys.executable, "-m", "kvsched.cli", "ray-serve", str(path), "--dry-run"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "store.url" in r.stderr


@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "0"])
def test_the_engines_store_ttl_setting_is_finite_and_bounded(value: str) -> None:
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
    from kvsched.core.disk_tier import DiskConfigError

    with pytest.raises(DiskConfigError, match="kv_ttl|KV_TTL"):
        LevelsConfig.from_extra({"store_url": "redis://127.0.0.1:6379/0", "kv_ttl_s": value})


def test_ray_serve_stops_its_local_store_when_the_start_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by review: an error while Ray started (an unreachable --address, a failed deployment, Ctrl-C) left the
    redis-server `store: {url: local}` had started running, orphaned."""
    import argparse
    import shutil
    import subprocess

    import ray

    from kvsched.commands import ray_serve

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server (make redis)")

    def unreachable(*_a: object, **_k: object) -> None:
        raise ConnectionError("no Ray cluster there")

    def redis_pids() -> set[str]:
        return set(subprocess.run(["pgrep", "-x", "redis-server"], capture_output=True, text=True).stdout.split())

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", unreachable)
    before = redis_pids()
    args = argparse.Namespace(config=Path(__file__).parents[2] / "examples/ray/tiny-cpu-store.yaml",
                              address="10.0.0.99:6379", num_cpus=None, dry_run=False)
    assert ray_serve.run(args) == 2  # Ray's ConnectionError: one line (tests/ray/test_ray_serve_inputs.py)
    assert redis_pids() - before == set()
