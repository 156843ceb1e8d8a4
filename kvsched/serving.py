"""Start and stop a real `vllm serve` process on loopback (used by the demo, the benchmarks and the tests)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from kvsched.install_check import IncompleteInstall, vllm_install_problem
from kvsched.serving_in_engine import IN_ENGINE_ARGS, IN_ENGINE_ENV, WORKERS, Worker, in_engine_conflict


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit (as Ctrl-C raises KeyboardInterrupt), so the `finally` blocks that stop
    `vllm serve` children run: the children lead process groups of their own, which a terminal's or a supervisor's
    signal to ours does not reach. Main thread only (elsewhere a no-op)."""
    def leave(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, leave) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_command() -> list[str]:
    """The `vllm` console script of this interpreter's environment."""
    exe = Path(sys.executable).with_name("vllm")
    return [str(exe)] if exe.exists() else [shutil.which("vllm") or "vllm"]


@dataclass
class ServerSpec:
    model: Path
    scheduler: str | None = "kvsched"  # None: stock vLLM (no --scheduler flag at all)
    max_model_len: int = 2048
    block_size: int = 32
    num_blocks: int | None = None  # --num-gpu-blocks-override
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    api_key: str | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    served_model_name: str = "tiny"
    dtype: str | None = None  # --dtype; None: a tiny model's own dtype (vLLM's auto downcasts float32), else vLLM's
    enforce_eager: bool = True  # False: vLLM's CUDA graphs (its default on a GPU; nothing to capture on the CPU)
    # True: the server starts a session of its own (with Linux's autogroup scheduler, on by default, also a CPU share
    # of its own, equal to that of the whole session that started it). False: it stays in the caller's session and
    # scheduling group and only leads a process group of its own (killed as a unit either way).
    own_session: bool = True
    # "in_engine": the model worker inside the engine-core process (`Worker`; one worker only: no tensor or pipeline
    # parallelism). vLLM's own default otherwise: `kvsched serve` and the demo keep it.
    worker: Worker = "default"

    def __post_init__(self) -> None:
        if self.worker not in WORKERS:
            raise ValueError(f"ServerSpec.worker must be one of {', '.join(WORKERS)}, got {self.worker!r}")
        if self.worker == "in_engine" and (conflict := in_engine_conflict(self.extra_args)):
            raise ValueError(conflict)

    def worker_env(self) -> dict[str, str]:
        """The environment the worker layout needs (laid over the caller's and `env`)."""
        return dict(IN_ENGINE_ENV) if self.worker == "in_engine" else {}

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The whole environment its `vllm serve` process gets: `base` (this process's by default), vLLM's CPU
        defaults where `base` sets none, `env`, then the worker layout's. What the engine reads its KVSCHED_* settings
        from (`kvsched.bench.engine_settings` records them from it)."""
        env = dict(os.environ if base is None else base)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.update(self.env)
        env.update(self.worker_env())
        return env

    def serve_dtype(self) -> str | None:
        from kvsched.tiny_model import tiny_model_dtype

        return self.dtype or tiny_model_dtype(self.model)

    def argv(self, port: int) -> list[str]:
        args = [*vllm_command(), "serve", str(self.model), "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", self.served_model_name, *(["--enforce-eager"] if self.enforce_eager else []),
                "--max-model-len", str(self.max_model_len), "--block-size", str(self.block_size),
                "--disable-uvicorn-access-log"]
        if dtype := self.serve_dtype():
            args += ["--dtype", dtype]
        if self.scheduler:
            args += ["--scheduler", self.scheduler]
        if self.num_blocks is not None:
            args += ["--num-gpu-blocks-override", str(self.num_blocks)]
        if self.api_key:
            args += ["--api-key", self.api_key]
        if self.worker == "in_engine":
            args += IN_ENGINE_ARGS
        return args + list(self.extra_args)


ENGINE_DIED = b"engine core exited unexpectedly"  # vLLM 0.32 (v1/engine/core_client.py), its API server's log


class ServerExited(RuntimeError):
    """A `vllm serve` child that exited while starting or while in use."""


def exit_status(code: int) -> str:
    """A child's return code as words: a negative one is the signal that killed it."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class VllmServer:
    """A `vllm serve` child process. Use as a context manager; `url` is its OpenAI base URL."""

    def __init__(self, spec: ServerSpec, log_path: Path | None = None, startup_timeout_s: float = 300.0) -> None:
        self.spec = spec
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self._deadline = 0.0

    def start(self) -> VllmServer:
        """Launch (unless `launch` already did) and wait until it serves. A launched process that has exited is not
        launched again: `wait_ready` raises with its log."""
        if self.proc is None:
            self.launch()
        return self.wait_ready()

    def launch(self) -> VllmServer:
        """Spawn the process without waiting for it (`wait_ready` does): see `start_all`."""
        if (why := vllm_install_problem()) is not None:
            raise IncompleteInstall(why)
        env = self.spec.environment()
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process lifetime
        group: dict[str, Any] = {"start_new_session": True} if self.spec.own_session else {"process_group": 0}
        self.proc = subprocess.Popen(self.spec.argv(self.port), stdout=log, stderr=subprocess.STDOUT, env=env,
                                     **group)
        self._deadline = time.monotonic() + self.startup_timeout_s
        return self

    def wait_ready(self) -> VllmServer:
        """Wait until /health answers; a process that exits or outlasts the start-up timeout (counted from its launch)
        raises with its log. A server launched long before (see `start_all`, tests' shared servers) that serves is
        ready at once, whenever this is called."""
        assert self.proc is not None, "launch() first"
        while True:
            if self.proc.poll() is not None:
                raise ServerExited(f"vllm serve {exit_status(self.proc.returncode)} while starting; its log "
                                   f"({self.log_path}) ends:\n{self.log_tail()}")
            if self._serves_our_model():
                return self
            if self._engine_died():
                self.stop()
                raise ServerExited(f"vllm serve's engine core died while starting (its API server stays up, never "
                                   f"serving); its log ({self.log_path}) ends:\n{self.log_tail()}")
            if time.monotonic() >= self._deadline:
                break
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def _engine_died(self) -> bool:
        """vLLM 0.32's API server, its engine core gone before the start-up ended, logs ENGINE_DIED and waits for ever
        (a shared test server waited out its 300 s so, the suite with it)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
                return ENGINE_DIED in f.read()
        except OSError:
            return False

    def _serves_our_model(self) -> bool:
        """/health answers and /v1/models names this server's model: the port is picked free and then released, so
        another process may have taken it since (its /health would pass alone)."""
        headers = {"Authorization": f"Bearer {self.spec.api_key}"} if self.spec.api_key else {}
        try:
            with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(urllib.request.Request(self.url + "/models", headers=headers), timeout=2) as r:
                models = json.loads(r.read())
        except urllib.error.HTTPError as exc:  # a key passed in extra_args: the model cannot be listed, /health did
            return exc.code in (401, 403)
        except (OSError, ValueError):
            return False
        data = models.get("data") if isinstance(models, dict) else None
        return isinstance(data, list) and any(isinstance(m, dict) and m.get("id") == self.spec.served_model_name
                                              for m in data)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)
            self.proc.wait(timeout=timeout_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """vLLM's and kvsched's Prometheus samples, summed over labels (name -> value)."""
        try:
            with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError as exc:
            self.raise_if_exited(exc)
            raise
        return parse_prometheus(text)

    def raise_if_exited(self, cause: BaseException) -> None:
        """ServerExited (naming how the process ended and its log) when the server is gone: a call that failed on it
        says why, not only `Connection refused` (test_demo's failure did, when another test killed its servers)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise ServerExited(f"vllm serve (port {self.port}) {exit_status(self.proc.returncode)} while in use "
                               f"({cause}); its log ({self.log_path}) ends:\n{self.log_tail()}") from cause

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples by bare name (summed over labels) and, for labelled samples, also by `name{labels}` (labels in the
    order the exposition gives them), read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, value = sample.name, float(sample.value)
            out[name] = out.get(name, 0.0) + value
            if sample.labels:
                labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels.items())
                out[f"{name}{{{labels}}}"] = value
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def start_all(servers: list[VllmServer]) -> list[VllmServer]:
    """Start several servers at once and wait for all. A start-up is three Python processes importing vLLM one after
    another, each on one core, so on a multi-core host the start-ups overlap (two servers on 2 cores: ~30 s instead of
    ~60 s). A server waiting idle takes no CPU (measured: 0 CPU-seconds over 20 s for its API server, engine core and
    worker), so sides measured one after another are not disturbed by the others waiting. If one fails to start, all
    are stopped and its error is raised."""
    try:
        for server in servers:
            server.launch()
        for server in servers:
            server.wait_ready()
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers
