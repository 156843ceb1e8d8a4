"""One `vllm serve --scheduler kvsched` start-up of the tiny test model (`ServerSpec` defaults) in a worker layout
(`ServerSpec.worker`): the wall time until it serves and each process's CPU seconds and resident memory then (from
/proc). What the suite's start-ups cost in each layout (BENCHMARKS.md, "Test-suite start-ups"). Start it under
`flock /tmp/kv/heavy.lock` on a shared machine.

    python tools/startup_probe.py default|in_engine
"""

from __future__ import annotations

import os
import sys
import time

from kvsched.bench.router_real import group_members
from kvsched.serving import WORKERS, ServerSpec, VllmServer
from kvsched.tiny_model import ensure_tiny_model


def usage(pid: int) -> tuple[str, float, int]:
    """(title, CPU seconds, resident MiB) of a live process."""
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        title = f.read().split(b"\0")[0].decode(errors="replace")[:40]
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    with open(f"/proc/{pid}/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    return title, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), resident


def main(layout: str) -> None:
    if layout not in WORKERS:
        raise SystemExit(f"usage: startup_probe.py {'|'.join(WORKERS)}")
    model = ensure_tiny_model("test")
    t0 = time.monotonic()
    server = VllmServer(ServerSpec(model=model, worker=layout)).start()  # type: ignore[arg-type]
    wall = time.monotonic() - t0
    try:
        assert server.proc is not None
        rows = [usage(pid) for pid in group_members(server.proc.pid)]
    finally:
        server.stop()
    print(f"{layout}: ready in {wall:.1f} s; {sum(r[1] for r in rows):.1f} CPU-s; "
          f"{sum(r[2] for r in rows) / 1024:.1f} GiB resident")
    for title, cpu, resident in rows:
        print(f"  {title:40s} {cpu:6.1f} CPU-s {resident:6d} MiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) == 2 else "")
