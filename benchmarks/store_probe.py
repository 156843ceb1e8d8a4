"""Which engine holds kvsched's shared level? Put/get throughput of KV-block-sized values on this machine, for every
candidate that installs here: Redis (apt `redis-server` + the `redis` client), Mooncake's store (PyPI
`mooncake-transfer-engine-non-cuda`, TCP, its own `mooncake_master`), LMCache's remote backends (PyPI `lmcache`).

Each candidate runs as a real server on loopback; one client thread puts N values then gets them back (the
engine's writer thread and its in-step reads are one thread each). Values are random bytes of the sizes a KV block
takes in FP8: 64 KiB (a small model) and 1 MiB (Llama-3-8B, 16 tokens: 32 layers x 8 KV heads x 16 x 256 bytes).

    python benchmarks/store_probe.py --out benchmarks/results/store_probe.json
    /tmp/venv-with-mooncake/bin/python benchmarks/store_probe.py --only mooncake   # in a venv that has it

A candidate that does not install or start is reported with the reason, not skipped silently.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SIZES = (64 << 10, 1 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s}s")


def measure(put: Callable[[str, bytes], Any], get: Callable[[str], bytes | None], size: int,
            total_bytes: int) -> dict[str, float]:
    n = max(8, total_bytes // size)
    values = [os.urandom(size) for _ in range(min(n, 16))]
    t0 = time.perf_counter()
    for i in range(n):
        put(f"probe/{size}/{i}", values[i % len(values)])
    t_put = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n):
        got = get(f"probe/{size}/{i}")
        if got is None or len(got) != size:
            raise RuntimeError(f"get {i} returned {None if got is None else len(got)} bytes, not {size}")
    t_get = time.perf_counter() - t0
    mib = n * size / 2**20
    return {"values": n, "put_mib_s": round(mib / t_put, 1), "get_mib_s": round(mib / t_get, 1),
            "put_ms_per_value": round(1000 * t_put / n, 3), "get_ms_per_value": round(1000 * t_get / n, 3)}


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def missing(exc: BaseException) -> dict[str, Any]:
    return {"installed": False, "reason": f"{type(exc).__name__}: {exc}"}


def each_size(out: dict[str, Any], put: Callable[[str, bytes], Any], get: Callable[[str], bytes | None],
              clear: Callable[[], Any], total_bytes: int) -> dict[str, Any]:
    for size in SIZES:
        try:
            out[f"{size >> 10}KiB"] = measure(put, get, size, total_bytes)
        except RuntimeError as exc:
            out[f"{size >> 10}KiB"] = {"error": str(exc)}
        clear()
    return out


def probe_redis(total_bytes: int) -> dict[str, Any]:
    exe = shutil.which("redis-server")
    if exe is None:
        return {"installed": False, "reason": "redis-server not on PATH (apt-get install -y redis-server)"}
    import redis

    port = free_port()
    with running([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]) as proc:
        wait_port(port)
        r = redis.Redis(host="127.0.0.1", port=port)
        out: dict[str, Any] = {"installed": True, "version": r.info()["redis_version"],
                               "client": f"redis-py {redis.__version__}"}
        each_size(out, lambda k, v: r.set(k, v, ex=600), r.get, r.flushall, total_bytes)
        rss = int(subprocess.run(["ps", "-o", "rss=", "-p", str(proc.pid)], capture_output=True, text=True)
                  .stdout.strip() or 0)
        out["server_rss_mib_idle"] = round(rss / 1024, 1)
        return out


def probe_mooncake(total_bytes: int) -> dict[str, Any]:
    try:
        import mooncake
        from mooncake.store import MooncakeDistributedStore
    except Exception as exc:  # noqa: BLE001 - reported
        return missing(exc)
    rpc, meta = free_port(), free_port()
    argv = [str(Path(mooncake.__file__).with_name("mooncake_master")), f"--rpc_port={rpc}", "--rpc_address=127.0.0.1",
            "--enable_http_metadata_server=true", f"--http_metadata_server_port={meta}",
            "--default_kv_lease_ttl=600000"]
    with running(argv):
        wait_port(rpc)
        wait_port(meta)
        store = MooncakeDistributedStore()
        rc = store.setup("127.0.0.1", f"http://127.0.0.1:{meta}/metadata", 1024 << 20, 256 << 20, "tcp", "",
                         f"127.0.0.1:{rpc}")
        if rc != 0:
            return {"installed": True, "started": False, "reason": f"setup returned {rc}"}

        def put(k: str, v: bytes) -> None:
            if store.put(k, v) != 0:
                raise RuntimeError(f"put {k} failed")

        def get(k: str) -> bytes | None:
            got = store.get(k)
            return bytes(got) if got else None

        out = each_size({"installed": True, "started": True, "client": "mooncake.store (TCP)"}, put, get,
                        store.remove_all, total_bytes)
        store.close()
        return out


def probe_lmcache(total_bytes: int) -> dict[str, Any]:
    try:
        import lmcache
        import lmcache.v1.storage_backend.connector as connectors
        import torch
    except Exception as exc:  # noqa: BLE001 - reported
        return missing(exc)
    import pkgutil

    remote = sorted(m.name[:-len("_connector")] for m in pkgutil.iter_modules(connectors.__path__)
                    if m.name.endswith("_connector") and m.name not in ("base_connector", "instrumented_connector"))
    # LMCache's remote backends are clients of other engines (redis, valkey, mooncakestore, s3, ...) or of its own
    # `lm://` server, storing LMCache's chunk objects through LMCache's engine and connector: not a byte store kvsched
    # can put its FP8 blocks in without adopting LMCache as its KV connector. Its redis backend's engine is the Redis
    # measured above.
    return {"installed": True, "version": getattr(lmcache, "__version__", "?"), "torch_pulled_in": torch.__version__,
            "remote_backends": remote,
            "note": "its remote backends are LMCache-engine clients of other stores (its redis:// is Redis)"}


PROBES = {"redis": probe_redis, "mooncake": probe_mooncake, "lmcache": probe_lmcache}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=sorted(PROBES), nargs="+", default=None)
    p.add_argument("--mib", type=int, default=256, help="bytes moved per size and direction (MiB)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    result: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0],
                              "mib_per_size": args.mib, "command": " ".join(sys.argv)}
    for name in args.only or sorted(PROBES):
        with tempfile.TemporaryDirectory():
            result[name] = PROBES[name](args.mib << 20)
        print(name, json.dumps(result[name]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
