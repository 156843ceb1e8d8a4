"""What a real `vllm serve` of the tiny test model does with vLLM options in a worker layout (`ServerSpec.worker`):
ready or not within the timeout (a hang), exited (vLLM's or kvsched's refusal: its last log lines), and once ready its
processes (a `VLLM::Worker` of its own means the worker ran apart) and one completion's answer. How
`kvsched.serving_in_engine.in_engine_conflict`'s choice of options was checked (BENCHMARKS.md, "Data parallelism with
the worker in the engine core"). Start it under `flock /tmp/kv/heavy.lock` on a shared machine; `--stock` serves with
stock vLLM's scheduler, else `--scheduler kvsched`. Each ARGS is one command line's options, quoted.

    python tools/layout_args_probe.py [--stock] default|in_engine ARGS [ARGS ...]
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

from kvsched.serving import WORKERS, ServerSpec, VllmServer
from kvsched.tiny_model import ensure_tiny_model
from tests.vllm_layout import process_titles

TIMEOUT_S = 100.0  # the tiny model is ready in 15-35 s in either layout on the 2-core Xeon


def probe(worker: str, args: list[str], stock: bool) -> dict[str, object]:
    spec = ServerSpec(model=ensure_tiny_model("test"), worker=worker, extra_args=args,  # type: ignore[arg-type]
                      scheduler=None if stock else "kvsched")
    server = VllmServer(spec, log_path=Path(f"/tmp/layout-probe-{worker}-{'_'.join(args).strip('-')}.log"),
                        startup_timeout_s=TIMEOUT_S)
    out: dict[str, object] = {"worker": worker, "args": args, "stock": stock}
    start = time.monotonic()
    try:
        server.launch().wait_ready()
        out["ready_s"] = round(time.monotonic() - start, 1)
        assert server.proc is not None
        out["processes"] = process_titles(server.proc.pid)
        body = json.dumps({"model": spec.served_model_name, "prompt": "hello", "max_tokens": 4}).encode()
        req = urllib.request.Request(server.url + "/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                out["answer"] = r.status
        except Exception as exc:  # noqa: BLE001 - what the probe reports
            out["answer"] = repr(exc)
    except TimeoutError:
        out["hang"] = f"not ready after {TIMEOUT_S:.0f} s"
    except RuntimeError:
        out["exited"] = server.log_tail(3)
    finally:
        server.stop()
    return out


def main(argv: list[str]) -> int:
    stock = argv[:1] == ["--stock"]
    argv = argv[1:] if stock else argv
    if len(argv) < 2 or argv[0] not in WORKERS:
        print(__doc__, file=sys.stderr)
        return 2
    for args in argv[1:]:
        print(json.dumps(probe(argv[0], args.split(), stock)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
