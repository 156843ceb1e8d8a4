"""Start and stop a real `vllm serve` process on loopback (used by the demo, the benchmarks and the tests)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

from kvsched.install_check import IncompleteInstall, vllm_install_problem

# Where vLLM's model worker runs (ServerSpec.worker): "default", where vLLM puts it (on the CPU build, a process of its
# own beside the engine core: three processes in all); "in_engine", inside the engine-core process (two processes),
# the layout vLLM itself picks on a GPU with one GPU per engine. Each process imports vLLM: the tiny model's start-up
# in_engine took 14.8 CPU-seconds and 14.5 s to serve against 21.4 and 19.5 s (tools/startup_probe.py, BENCHMARKS.md).
Worker = Literal["default", "in_engine"]
WORKERS: tuple[str, ...] = get_args(Worker)
# vLLM's CPU platform replaces the `uni` executor by `mp` unless this is "0" (vllm/platforms/cpu.py, 0.32); AsyncLLM
# (the API server) keeps its engine core in a process of its own whatever it says. vLLM binds the worker's OpenMP
# threads (VLLM_CPU_OMP_THREADS_BIND other than "nobind", VllmServer's default) only for a worker process of its own.
IN_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
IN_ENGINE_ARGS = ["--distributed-executor-backend", "uni"]
# vLLM options (0.32's engine/arg_utils.py) that "in_engine" cannot honour: a rank count above 1 (the uni executor
# starts one worker, which then waits for the other ranks for ever: found by review, `--tensor-parallel-size 2` hung
# the start-up until its timeout with nothing in the log) and another executor (the caller's flags come last and win:
# the worker ran apart, the layout asked for was ignored).
# Data parallelism (-dp, --data-parallel-*, --nnodes, -dcp) is not refused: checked with a real `vllm serve`
# (tools/layout_args_probe.py; BENCHMARKS.md, "Data parallelism with the worker in the engine core"), none hangs or is
# ignored because of "in_engine": `-dp 2` runs one engine core a rank, each with its worker inside; what fails (a dense
# model's -dp 2 at its first request, ranks left to another node, -dcp or --nnodes past the one rank) fails alike, or
# is refused alike, in vLLM's own layout.
RANK_OPTIONS = {"--tensor-parallel-size": "-tp", "--pipeline-parallel-size": "-pp",
                "--prefill-context-parallel-size": "-pcp"}
EXECUTOR_OPTION = "--distributed-executor-backend"


def _count(value: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        return None  # not a count: vLLM's parser refuses it itself


MAX_CONFIG_BYTES = 2**20  # a file of vLLM options is a few KiB; PyYAML parses ~1 MiB a second (pure Python)


def _read_config(path: str) -> str:
    """The text of `--config FILE`, refused (ValueError) unless a regular file of at most MAX_CONFIG_BYTES: found by
    review, a FIFO hung the check for ever (and what it read, vLLM would no longer find), and the check parsed any
    size. Opened without blocking, then examined, so no file swapped in after a look can block it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory too: open() would name the descriptor, not the path
            raise ValueError("not a regular file (what the check read from a FIFO or a device, vLLM would not)")
        with open(fd, "rb", closefd=False) as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"over {MAX_CONFIG_BYTES} bytes, past any file of vLLM options")
    return data.decode("utf-8")  # UnicodeDecodeError, a ValueError, as vLLM's reading fails


def _config_args(path: str) -> list[str]:
    """vLLM's reading of `--config FILE.yaml` into arguments (0.32's FlexibleArgumentParser.load_config_file): each key
    `--key value`, a true flag `--key`, a list `--key item ...`, a mapping its JSON. ValueError if it cannot be read.
    A mapping, or a list in a list, is written "{...}" or "[...]": neither names an option nor counts ranks, and
    written out in full a YAML of aliases (`*a`) took time and memory exponential in its size (found by review)."""
    import yaml

    try:
        config = yaml.safe_load(_read_config(path))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(str(exc)) from exc
    except RecursionError:  # PyYAML composes a node per nesting level, recursively (as vLLM's own read dies)
        raise ValueError("nested too deeply to read (found by review: a few KiB of '[' was a RecursionError "
                         "traceback)") from None
    if not isinstance(config, dict):
        raise ValueError(f"a YAML mapping of vLLM options was expected, got {type(config).__name__}")
    args: list[str] = []
    for key, value in config.items():
        if isinstance(value, bool):
            args += [f"--{key}"] if value else []  # `--no-KEY` for false: none of these options is a flag
        elif isinstance(value, list):
            args += [f"--{key}", *map(_item, value)] if value else []
        else:
            args += [f"--{key}", _item(value)]
    return args


def _item(value: object) -> str:
    """A value as vLLM writes it into an argument, a container but its shape (see _config_args)."""
    return "{...}" if isinstance(value, dict) else "[...]" if isinstance(value, list) else str(value)


def in_engine_conflict(args: Sequence[str], file_elsewhere: bool = False) -> str | None:
    """Why vLLM options `args` cannot run with the model worker in the engine core ("in_engine"), or None. Read as
    vLLM reads them: `--name value` or `--name=value`, `_` for `-` in a long name, the short forms (-tp, -pp, -pcp), a
    name's abbreviation, long or short (argparse's, on in vLLM: none of these names' prefixes is another option's name,
    so a prefix means that option or is refused by vLLM as ambiguous: `-t 2` is `-tp 2`), the options of a `--config
    FILE` (vLLM places them before the command line: found by review, a file's `tensor-parallel-size: 2` passed), and
    an option's last value winning. A config file that cannot be read is refused (the check cannot see its options),
    unless `file_elsewhere`: the file is read where the server runs (a Ray replica's machine, which checks it again
    before its engine starts: kvsched.adapters.ray.engine.replica_spec), so only the command line, whose options win
    over the file's, is checked here."""
    args, from_file, path = list(args), 0, ""
    if "--config" in args[:-1]:  # vLLM reads the exact word only: `--config=FILE` is parsed and ignored
        at = args.index("--config")
        path = args[at + 1]
        try:
            config = _config_args(path)
        except ValueError as exc:
            if not file_elsewhere:
                return (f"--config {path}: worker 'in_engine' must check the vLLM options of this file and cannot "
                        f"read it ({exc})")
            config = []
        args, from_file = config + args[:at] + args[at + 2:], len(config)
    longs = (*RANK_OPTIONS, EXECUTOR_OPTION)
    names = {**{long: long for long in longs}, **{short: long for long, short in RANK_OPTIONS.items()}}
    last: dict[str, tuple[str, str]] = {}  # option -> (as written, its value): argparse keeps an option's last value
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        name, eq, value = arg.partition("=")
        if name.startswith("--"):
            name = "--" + name[2:].replace("_", "-")
        option = names.get(name)
        if option is None and name.startswith("--") and len(name) > 3:
            option = next((long for long in longs if long.startswith(name)), None)
        elif option is None and len(name) > 1 and name[1] != "-":  # -t, -pc: argparse's prefix of a short form too
            option = next((long for long, short in RANK_OPTIONS.items() if short.startswith(name)), None)
        if option is None:
            continue
        if not eq:
            value = args[i + 1] if i + 1 < len(args) else ""
        written = arg if eq else f"{arg} {value}"
        last[option] = (f"{written} (in --config {path})" if i < from_file else written, value)
    for option, (written, value) in last.items():
        if option == EXECUTOR_OPTION:
            if value.strip() != "uni":
                return (f"{written}: worker 'in_engine' runs the model worker in the engine core with vLLM's uni "
                        f"executor; use worker 'default' for another executor")
        elif _count(value) not in (None, 1):
            return (f"{written}: worker 'in_engine' runs one model worker, in the engine core, whose start-up would "
                    f"wait for the other ranks for ever; use worker 'default' (a process a rank)")
    return None


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
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self._serves_our_model():
                return self
            if time.monotonic() >= self._deadline:
                break
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

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
        with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        return parse_prometheus(text)

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
