"""`vllm serve` arguments: --scheduler kvsched and the checks run once parsing is done (the FP8 tier's flags:
tier_args)."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from kvsched.adapters.vllm.compat.requests import mark_keyed_server
from kvsched.adapters.vllm.compat.tier_args import add_tier_arguments, apply_tier
from kvsched.adapters.vllm.compat.version import unsupported_vllm

# ---- CLI --------------------------------------------------------------------------------------------------------
SCHEDULERS: dict[str, str | None] = {
    "kvsched": "kvsched.adapters.vllm.scheduler.KVSchedScheduler",
    "default": None,  # vLLM's own choice (AsyncScheduler when async scheduling is on)
}
MIDDLEWARE_PATH = "kvsched.adapters.vllm.middleware.KVSchedMiddleware"


def resolve_scheduler_name(value: str) -> str | None:
    """Map `--scheduler NAME` to a class path, rejecting unknown names with the list of choices."""
    if value in SCHEDULERS:
        return SCHEDULERS[value]
    raise argparse.ArgumentTypeError(
        f"unknown scheduler {value!r}; choose one of: {', '.join(SCHEDULERS)} "
        f"(or pass a class path with --scheduler-cls module.Class)"
    )


def is_kvsched_scheduler(scheduler_cls: object) -> bool:
    """Whether the server runs kvsched's scheduler: one of kvsched's class paths, or a subclass of KVSchedScheduler
    (`--scheduler-cls myco.MyKV`; found by review: a subclass named by its own path got no tier, settings checks or
    middleware). A path outside kvsched and vLLM is looked at by `_imported_subclass`, without running modules that
    cannot hold such a subclass."""
    if isinstance(scheduler_cls, str):
        return scheduler_cls.startswith("kvsched.") or _imported_subclass(scheduler_cls)
    if str(getattr(scheduler_cls, "__module__", "")).startswith("kvsched."):
        return True
    mro = getattr(scheduler_cls, "__mro__", ())
    return any(f"{c.__module__}.{c.__qualname__}" == SCHEDULERS["kvsched"] for c in mro)


@functools.cache
def _imported_subclass(path: str) -> bool:
    """Whether `path` ("module.Class") names a KVSchedScheduler subclass. The module is imported only when it is
    already loaded or its source names kvsched (a subclass must import it); found by review: every --scheduler-cls
    outside vLLM was imported in the API server at parse time, kvsched selected or not, running a user's or a platform
    plugin's module-level code there, and a `sys.exit` in it ended the parse. Whatever its import raises, SystemExit
    included, means "not kvsched's" (the engine core imports it again and says why); Ctrl-C is not swallowed. A
    subclass whose module reaches KVSchedScheduler only through another module of its own is not recognised."""
    module, _, name = path.rpartition(".")
    if not module or path.startswith("vllm."):
        return False
    if module not in sys.modules and "kvsched" not in (_module_source(module) or ""):
        return False
    try:
        cls = getattr(importlib.import_module(module), name)
    except KeyboardInterrupt:
        raise
    except BaseException:
        return False
    return isinstance(cls, type) and is_kvsched_scheduler(cls)


def _module_source(module: str) -> str | None:
    """The source text of `module`, found as the import system finds it (sys.meta_path, package by package) but without
    importing it or its parent packages (`importlib.util.find_spec` imports the parents, running their __init__);
    None when it cannot be found or has no Python source."""
    search: Any = None
    spec = None
    parts = module.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        loaded = sys.modules.get(name)
        spec = getattr(loaded, "__spec__", None) if loaded is not None else None
        for finder in [] if spec is not None else sys.meta_path:
            try:
                spec = finder.find_spec(name, search) if hasattr(finder, "find_spec") else None
            except (ImportError, ValueError, OSError):
                spec = None
            if spec is not None:
                break
        if spec is None:
            return None
        search = spec.submodule_search_locations
        if search is None and i < len(parts) - 1:
            return None
    try:
        get_source = getattr(spec.loader, "get_source", None) if spec is not None else None
        return get_source(module) if get_source is not None else None
    except (ImportError, OSError, SyntaxError, UnicodeDecodeError):
        return None


class _SchedulerAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, resolve_scheduler_name(str(values)))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --scheduler: {exc}")


def _scheduler_cls_type(original: Any) -> Any:
    """`--scheduler-cls`'s type: kvsched's short names (`--scheduler-cls kvsched`) map to their class path; anything
    else goes to vLLM's own type unchanged (`optional_type(str)`: "" and "None" are vLLM's default). Found by review:
    replacing vLLM's type refused `--scheduler-cls None` and YAML `scheduler-cls: null` on every server with the plugin
    installed, kvsched selected or not."""

    def scheduler_cls(value: str) -> Any:
        if SCHEDULERS.get(value) is not None:
            return SCHEDULERS[value]
        return value if original is None else original(value)

    scheduler_cls.__name__ = getattr(original, "__name__", "scheduler_cls")  # argparse names it in its errors
    return scheduler_cls


def extend_engine_parser(parser: Any) -> None:
    """Add `--scheduler NAME` (dest scheduler_cls) and the FP8 tier's flags to vLLM's argument parser, and the checks
    run once the arguments are complete (which add kvsched's API-server middleware when kvsched is selected)."""
    if any("--scheduler" in a.option_strings for a in parser._actions):
        return
    parser.add_argument(
        "--scheduler", dest="scheduler_cls", action=_SchedulerAction, metavar="{" + ",".join(SCHEDULERS) + "}",
        help="Scheduler by short name (added by the kvsched plugin). 'kvsched' keeps each session's KV "
             "resident between turns; 'default' is vLLM's own scheduler.",
    )
    for action in parser._actions:
        if action.dest == "scheduler_cls" and "--scheduler-cls" in action.option_strings:
            action.type = _scheduler_cls_type(action.type)
    add_tier_arguments(parser)
    _check_after_parsing(parser)


def cpu_refusal(args: argparse.Namespace) -> str | None:
    """Why this machine cannot serve `args` with kvsched, in one line, or None. Today: an FP8 KV cache on vLLM's CPU
    backend without AVX-512/AMX, which the engine core would otherwise die on after loading the model, with a
    traceback naming none of this."""
    if not is_kvsched_scheduler(getattr(args, "scheduler_cls", None)):
        return None
    if not str(getattr(args, "kv_cache_dtype", "auto")).startswith("fp8"):
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from kvsched.ops.cpu_features import cpu_features

    return cpu_features().fp8_kv_cache_refusal()


def checkpoint_dtype(model: object, revision: object = None) -> str | None:
    """The dtype a checkpoint's config.json names (`torch_dtype`, or `dtype` as newer transformers write it), read
    without downloading anything: a local directory's file, or a hub model's from the local Hugging Face cache; None
    when neither has it."""
    if not isinstance(model, str) or not model:
        return None
    path = Path(model).expanduser() / "config.json"
    try:
        if not path.is_file():
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json", revision=revision if isinstance(revision, str)
                                            else None)
            if not isinstance(cached, str):
                return None
            path = Path(cached)
        config = json.loads(path.read_text())
    except Exception:  # not a model this can read without vLLM (which says why, if it cannot either)
        return None
    value = (config.get("torch_dtype") or config.get("dtype")) if isinstance(config, dict) else None
    return value.removeprefix("torch.") if isinstance(value, str) else None


def dtype_warning(args: argparse.Namespace) -> str | None:
    """Why this server will compute slower than it could, in one line, or None: a float32 checkpoint served with
    `--dtype auto`, which vLLM's CPU backend downcasts to bfloat16, on an x86 CPU without native bf16 (AVX512-BF16 or
    AMX), where vLLM's kernels emulate it. A warning: the user's dtype is left as it is. Found by the first run on an
    AVX2-only CPU (AMD EPYC family 25): `kvsched tiny-model` builds float32 there, and `vllm serve M --scheduler
    kvsched` without --dtype ran each linear layer about 6x slower (1,096 ms against 172 ms in float32), saying
    nothing but vLLM's "Downcasting torch.float32 to torch.bfloat16"."""
    if not is_kvsched_scheduler(getattr(args, "scheduler_cls", None)):
        return None
    if str(getattr(args, "dtype", "auto")).lower() != "auto":
        return None
    model = getattr(args, "model_tag", None) or getattr(args, "model", None)  # `vllm serve M` or `--model M`
    if checkpoint_dtype(model, getattr(args, "revision", None)) not in ("float32", "float"):
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from kvsched.ops.cpu_features import cpu_features

    features = cpu_features()
    if features.arch != "x86_64" or features.native_bf16:
        return None
    return ("this model is float32 and --dtype auto makes vLLM downcast it to bfloat16, which this CPU (no "
            "AVX512-BF16 or AMX) only emulates, several times slower; pass --dtype float32")


def parallel_refusal(args: argparse.Namespace) -> str | None:
    """Why kvsched cannot serve this server layout, in one line, or None. Found by a review on this CPU build: with
    vLLM's internal data-parallel load balancer a session's turns alternate between engines (each turn missed the KV
    its session's previous one left), kvsched's stats and session list showed engine 0 only, and a DELETE answered
    404 for a session another engine ended; with several API server processes kvsched's API-side state (compaction,
    response ids, its counters) was split between them. One engine per API server is what kvsched supports: the
    external load-balancer modes give each rank its own server, which a session-affine router (kvsched's Ray router)
    reaches."""
    if not is_kvsched_scheduler(getattr(args, "scheduler_cls", None)):
        return None
    dp = int(getattr(args, "data_parallel_size", 1) or 1)
    external = bool(getattr(args, "data_parallel_external_lb", False) or getattr(args, "data_parallel_rank", None)
                    is not None or getattr(args, "data_parallel_multi_port_external_lb", False))
    hybrid = bool(getattr(args, "data_parallel_hybrid_lb", False) or getattr(args, "data_parallel_start_rank", None)
                  is not None)
    local = int(getattr(args, "data_parallel_size_local", None) or dp) if hybrid else dp
    if dp > 1 and not external and local > 1:
        return (f"--data-parallel-size {dp} with vLLM's internal load balancer spreads a session's turns over "
                f"engines, so kvsched cannot keep its KV; run one vllm serve per GPU behind kvsched's Ray router, or "
                f"use --data-parallel-external-lb (one API server per rank) with a session-affine router")
    servers = getattr(args, "api_server_count", None)
    if servers is not None and int(servers) > 1:
        return (f"--api-server-count {servers}: kvsched's API-side state (compaction, response ids, its counters) "
                f"lives in one API server process; use 1")
    return None


def pipeline_refusal(args: argparse.Namespace) -> str | None:
    """Why vLLM cannot serve this server's VLLM_PP_LAYER_PARTITION, in one line, or None: a stage of 0 layers, which
    vLLM 0.32 accepts in its layer split but not in its KV cache sizing (`kvsched.core.rank_shares.partition_refusal`),
    and the split vLLM's workers would refuse later (malformed, another number of stages)."""
    if not is_kvsched_scheduler(getattr(args, "scheduler_cls", None)):
        return None
    from kvsched.core.rank_shares import PARTITION_ENV, partition_refusal

    return partition_refusal(os.environ.get(PARTITION_ENV), int(getattr(args, "pipeline_parallel_size", 1) or 1))


def summary_priority_warning(args: argparse.Namespace) -> str | None:
    """Why compaction's summary calls will not yield to user traffic, in one line, or None. They are sent at a lower
    vLLM priority (KVSCHED_COMPACTION_SUMMARY_PRIORITY), which vLLM's default `--scheduling-policy fcfs` ignores (its
    FCFS queue, v1/core/sched/request_queue.py, serves in arrival order); only `priority` honours it. A warning, not a
    refusal: FCFS serves the summary in its turn, which many operators may accept. Found by review: nothing said so."""
    policy = getattr(args, "scheduling_policy", None)  # vLLM 0.32: "fcfs" (its default) or "priority"
    if policy != "fcfs" or not is_kvsched_scheduler(getattr(args, "scheduler_cls", None)):
        return None
    from kvsched.core.compaction_config import CompactionConfig, InvalidCompactionInput

    try:
        summarizes = CompactionConfig.from_env().summarizes
    except InvalidCompactionInput:  # refused before this, naming the variable (engine_setting_errors)
        return None
    if not summarizes:
        return None
    return ("compaction's summary calls are sent at a lower priority (KVSCHED_COMPACTION_SUMMARY_PRIORITY), which "
            "vLLM's --scheduling-policy fcfs (its default) ignores: they queue with user requests in arrival order; "
            "add --scheduling-policy priority for them to yield to user traffic")


RAY_PREFIXES_VAR = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"


def vllm_picks_ray(args: argparse.Namespace) -> bool:
    """Whether vLLM 0.32 will choose Ray for the workers itself (`ParallelConfig.__post_init__`, config/parallel.py):
    no backend given, more than one worker, and this process inside a Ray placement group (a `vllm serve` started from
    a Ray task or actor). Found by review: only the flags were looked at, so those workers ran without KVSCHED_*. Ray
    is initialised here only if already imported: a process that has not imported it is in no placement group."""
    if getattr(args, "distributed_executor_backend", None) is not None:
        return False
    world = 1
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                 "prefill_context_parallel_size"):
        world *= int(getattr(args, name, 1) or 1)
    ray = sys.modules.get("ray")
    if world <= 1 or ray is None:
        return False
    try:
        if not ray.is_initialized():
            return False
        from ray.util import get_current_placement_group

        return bool(get_current_placement_group())
    except Exception:  # a Ray that cannot say: the environment is left alone
        return False


def carry_settings_to_ray_workers(args: argparse.Namespace) -> None:
    """With kvsched's scheduler on Ray workers: vLLM copies to them only the environment variables of its own prefixes
    (VLLM_, HF_, NCCL_, ...: `vllm/ray/ray_env.py`) and of those this variable adds, so add KVSCHED_ and a worker on
    another node runs with the engine's kvsched settings (the FP8 tier's, the shared store's URL), not the defaults.
    Additive (the operator's prefixes stay), and only then: the variable is one of vLLM's compile-cache factors, so
    setting it everywhere would miss a cache built without it (a review found that). Ray asked for by flag, or chosen
    by vLLM itself (`vllm_picks_ray`)."""
    if not is_kvsched_scheduler(getattr(args, "scheduler_cls", None)):
        return
    flags = (getattr(args, "distributed_executor_backend", None), getattr(args, "data_parallel_backend", None))
    if "ray" not in flags and not vllm_picks_ray(args):
        return
    prefixes = [p.strip() for p in os.environ.get(RAY_PREFIXES_VAR, "").split(",") if p.strip()]
    if "KVSCHED_" not in prefixes:
        os.environ[RAY_PREFIXES_VAR] = ",".join([*prefixes, "KVSCHED_"])


def add_middleware(ns: argparse.Namespace, kvsched: bool) -> None:
    """kvsched's API-server middleware, on a server that runs kvsched's scheduler only, before the user's own (where it
    was as the option's default). Found by review: it was the default of every `vllm serve`, and its
    constructor read the KVSCHED_* settings (logging their errors, opening a Redis client) on stock servers too."""
    if kvsched and isinstance(getattr(ns, "middleware", None), list) and MIDDLEWARE_PATH not in ns.middleware:
        ns.middleware = [MIDDLEWARE_PATH, *ns.middleware]


def _check_after_parsing(parser: Any) -> None:
    """Once the arguments are complete (whatever their order on the command line): exit with the version guard's,
    `cpu_refusal`'s, `parallel_refusal`'s or `pipeline_refusal`'s one line or the KVSCHED_* settings errors (one line
    each) before vLLM starts an engine, print the warnings (a misspelt KVSCHED_* name, `dtype_warning`,
    `summary_priority_warning`), and turn the FP8 tier on (`apply_tier`). The version guard runs here, for every way
    of selecting kvsched (found by review:
    only `--scheduler kvsched` ran it; `--scheduler-cls kvsched`, kvsched's class path, a subclass and a YAML --config
    skipped it)."""
    parse_known_args = parser.parse_known_args

    def checked(args: Any = None, namespace: Any = None) -> Any:
        ns, rest = parse_known_args(args, namespace)
        if is_kvsched_scheduler(getattr(ns, "scheduler_cls", None)) and (refusal := unsupported_vllm()):
            parser.exit(2, f"{refusal}\n")
        if (reason := cpu_refusal(ns) or parallel_refusal(ns) or pipeline_refusal(ns)) is not None:
            parser.exit(2, f"kvsched: {reason}\n")
        if is_kvsched_scheduler(getattr(ns, "scheduler_cls", None)):  # KVSCHED_* settings: refused now, by name
            from kvsched.adapters.vllm.settings_check import engine_setting_errors, engine_setting_warnings

            for misspelt in engine_setting_warnings():  # a misspelt name: said, not refused (the prefix is not ours)
                print(f"kvsched: warning: {misspelt}", file=sys.stderr)
            if (warning := dtype_warning(ns)) is not None:
                print(f"kvsched: warning: {warning}", file=sys.stderr)
            if errors := engine_setting_errors():
                parser.exit(2, "".join(f"kvsched: {e}\n" for e in errors))
            if (warning := summary_priority_warning(ns)) is not None:
                print(f"kvsched: warning: {warning}", file=sys.stderr)
            mark_keyed_server(ns)  # before the engine core starts: it inherits the variable
        kvsched = is_kvsched_scheduler(getattr(ns, "scheduler_cls", None))
        apply_tier(parser, ns, kvsched)
        carry_settings_to_ray_workers(ns)
        add_middleware(ns, kvsched)
        return ns, rest

    parser.parse_known_args = checked


def install_parser_hook() -> None:
    """Wrap `EngineArgs.add_cli_args` so the parser vLLM builds gets kvsched's options (idempotent).

    vLLM loads general plugins at the start of `AsyncEngineArgs.add_cli_args`, before the engine arguments are
    added, precisely so that a plugin can extend the parser this way."""
    from vllm.engine.arg_utils import EngineArgs

    current = EngineArgs.__dict__["add_cli_args"].__func__
    if getattr(current, "__kvsched_wrapped__", False):
        return

    def add_cli_args(parser: Any) -> Any:
        parser = current(parser)
        extend_engine_parser(parser)
        return parser

    add_cli_args.__kvsched_wrapped__ = True  # type: ignore[attr-defined]
    add_cli_args.__wrapped__ = current  # type: ignore[attr-defined]
    add_cli_args.__doc__ = current.__doc__
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
