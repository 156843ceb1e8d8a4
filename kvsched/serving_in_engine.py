"""Where vLLM's model worker runs (`ServerSpec.worker`), and worker "in_engine"'s check of vLLM options (`ServerSpec`,
Ray's replica config): the options it cannot honour, read as vLLM reads them, a `--config FILE`'s too."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Literal, get_args

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
