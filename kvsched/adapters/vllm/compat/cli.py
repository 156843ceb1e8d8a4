"""`vllm serve` arguments: --scheduler kvsched, the FP8 tier's flags and the checks run once parsing is done."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kvsched.adapters.vllm.compat.requests import mark_keyed_server
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
    name = scheduler_cls if isinstance(scheduler_cls, str) else getattr(scheduler_cls, "__module__", "")
    return isinstance(name, str) and name.startswith("kvsched.")


class _SchedulerAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, resolve_scheduler_name(str(values)))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument --scheduler: {exc}")
        if is_kvsched_scheduler(getattr(namespace, self.dest)) and (refusal := unsupported_vllm()):
            parser.exit(2, f"{refusal}\n")


def _scheduler_cls_type(value: str) -> str:
    """`--scheduler-cls` accepts vLLM's dotted class paths and kvsched's short names."""
    if value in SCHEDULERS and SCHEDULERS[value] is not None:
        return SCHEDULERS[value]  # type: ignore[return-value]
    if "." not in value:
        raise argparse.ArgumentTypeError(
            f"--scheduler-cls needs a dotted 'module.Class' path or one of: "
            f"{', '.join(k for k, v in SCHEDULERS.items() if v)}; got {value!r}"
        )
    return value


TIER_DEST = "kvsched_fp8_tier_gb"  # where the parser keeps --kvsched-fp8-tier-gb until the arguments are complete
# --kvsched-disk-tier-dir / -gb and --kvsched-store-url: the levels under the tier (kept here until parsing is done)
LEVEL_FLAGS = {"--kvsched-disk-tier-dir": "disk_dir", "--kvsched-disk-tier-gb": "disk_gb",
               "--kvsched-store-url": "store_url"}
LEVELS_DEST = "kvsched_tier_levels"


class _TierAction(argparse.Action):
    """`--kvsched-fp8-tier-gb GIB|auto`: the FP8 tier's size (0 turns it off), checked against this host's memory."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from kvsched.core.tier_config import TierConfigError

        try:
            gib = _tier_gib(values)
        except TierConfigError as exc:
            parser.error(f"argument --kvsched-fp8-tier-gb: {exc}")
        setattr(namespace, TIER_DEST, "auto" if gib is None else gib)


def _tier_gib(value: object) -> float | None:
    """A tier size as given (flag, variable or JSON) in GiB, None for auto; TierConfigError if malformed or larger
    than this host's memory. The one check behind every way a size reaches the command line."""
    from kvsched.adapters.vllm.tier_host import host_memory
    from kvsched.core.tier_config import check_fits_host, parse_tier_gib

    gib = parse_tier_gib(value)
    if gib:
        check_fits_host(int(gib * 2**30), host_memory()[0])
    return gib


def _apply_tier(parser: Any, ns: argparse.Namespace) -> None:
    """With `--scheduler kvsched` the FP8 tier is on unless told otherwise: set vLLM's kv_transfer_config to it (size
    from --kvsched-fp8-tier-gb, else KVSCHED_FP8_TIER_GB, else the default rule), unless the size is 0 or the command
    names another KV connector (then kvsched runs without its tier, and says so)."""
    from kvsched.adapters.vllm.fp8_tier_connector import ENV_TIER_GB, kv_transfer_config
    from kvsched.adapters.vllm.tier_config import CONNECTOR_NAME, hide_store_secret
    from kvsched.core.tier_config import parse_tier_gib

    asked = getattr(ns, TIER_DEST, None)
    if asked is not None:
        delattr(ns, TIER_DEST)
    levels = _take_levels(parser, ns)
    if not is_kvsched_scheduler(getattr(ns, "scheduler_cls", None)):
        if asked is not None:
            parser.error("--kvsched-fp8-tier-gb needs --scheduler kvsched (the tier holds KV kvsched releases)")
        return
    if (user := getattr(ns, "kv_transfer_config", None)) is not None:
        if asked is not None or levels:
            parser.error("--kvsched-fp8-tier-gb / --kvsched-disk-tier-* / --kvsched-store-url set "
                         "--kv-transfer-config; pass only one of them")
        if getattr(user, "kv_connector", None) == CONNECTOR_NAME:
            _check_user_tier(parser, user)
            if getattr(user, "kv_connector_extra_config", None):
                user.kv_connector_extra_config = hide_store_secret(dict(user.kv_connector_extra_config))
        return  # the user's own connector (the tier's JSON, or another one): kvsched runs without adding its tier
    gib = parse_tier_gib(asked) if asked is not None else _env_tier_gib(parser)
    if gib == 0:
        if levels:
            parser.error("the disk and shared levels restore through the FP8 tier: they need it on "
                         "(--kvsched-fp8-tier-gb > 0 or auto)")
        if env_levels := _env_levels():
            off = "--kvsched-fp8-tier-gb 0" if asked is not None else f"{ENV_TIER_GB}=0"
            parser.exit(2, f"kvsched: {' / '.join(env_levels)}: the disk level restores through the FP8 tier, which "
                        f"{off} turns off; unset it or turn the tier on\n")
        return
    from vllm.config import KVTransferConfig

    from kvsched.core.disk_tier import DiskConfigError

    try:
        cfg = kv_transfer_config("auto" if gib is None else gib, **levels)
    except (DiskConfigError, ValueError) as exc:
        parser.error(str(exc))
    # the URL goes to the environment (the engine and the API server's compaction read it), its password never into
    # the KVTransferConfig vLLM logs
    cfg["kv_connector_extra_config"] = hide_store_secret(cfg["kv_connector_extra_config"])
    ns.kv_transfer_config = KVTransferConfig(**cfg)


def _check_user_tier(parser: Any, user: Any) -> None:
    """A --kv-transfer-config naming the tier's connector: its size (or KVSCHED_FP8_TIER_GB without one), levels and
    load-failure policy checked now, as the flags are. Found by review: a bad size first failed in the engine, after
    the model loaded, inside vLLM's tracebacks and without naming the variable."""
    from kvsched.adapters.vllm.tier_levels_config import LevelsConfig
    from kvsched.core.disk_tier import DiskConfigError
    from kvsched.core.tier_config import TierConfigError

    extra = dict(getattr(user, "kv_connector_extra_config", None) or {})
    if "tier_gb" not in extra:
        _env_tier_gib(parser)  # refused naming the variable
    else:
        try:
            _tier_gib(extra["tier_gb"])
        except TierConfigError as exc:
            parser.error(f"--kv-transfer-config kv_connector_extra_config.tier_gb: {exc}")
    try:
        LevelsConfig.from_extra(extra)
    except (DiskConfigError, ValueError) as exc:
        parser.error(f"--kv-transfer-config kv_connector_extra_config: {exc}")
    if getattr(user, "kv_load_failure_policy", "recompute") != "recompute":
        parser.error("--kv-transfer-config: kvsched's FP8 tier needs \"kv_load_failure_policy\": \"recompute\" (a slot "
                     "that fails its checksum must be recomputed, not fail the request)")


def _env_tier_gib(parser: Any) -> float | None:
    """KVSCHED_FP8_TIER_GB (no flag gave a size) in GiB, None for auto: refused like the flag (also when larger than
    this host's memory), naming the variable, before an engine starts."""
    import os

    from kvsched.adapters.vllm.fp8_tier_connector import ENV_TIER_GB
    from kvsched.core.tier_config import TierConfigError

    raw = os.environ.get(ENV_TIER_GB, "auto")
    try:
        gib = _tier_gib(raw)
    except TierConfigError as exc:
        parser.exit(2, f"kvsched: {ENV_TIER_GB}={raw!r}: {str(exc).replace('--kvsched-fp8-tier-gb', ENV_TIER_GB)}\n")
    return gib


def _env_levels() -> list[str]:
    """The disk level's variables set (as LevelsConfig reads them). Not KVSCHED_STORE_URL: with the tier off it still
    shares the API server's compaction summaries between replicas (compaction_shared)."""
    from kvsched.adapters.vllm.tier_levels_config import ENV_DISK_DIR, ENV_DISK_GB, LevelsConfig

    cfg = LevelsConfig.from_extra({})  # checked before (engine_setting_errors)
    return [name for name, value in ((ENV_DISK_DIR, cfg.disk_dir), (ENV_DISK_GB, cfg.disk_gb)) if value]


def _take_levels(parser: Any, ns: argparse.Namespace) -> dict[str, Any]:
    """The --kvsched-disk-tier-* / --kvsched-store-url values given, removed from the namespace (vLLM never sees
    them); an error if given without --scheduler kvsched."""
    levels = getattr(ns, LEVELS_DEST, None) or {}
    if hasattr(ns, LEVELS_DEST):
        delattr(ns, LEVELS_DEST)
    if levels and not is_kvsched_scheduler(getattr(ns, "scheduler_cls", None)):
        parser.error(f"{', '.join(f for f, k in LEVEL_FLAGS.items() if k in levels)} need --scheduler kvsched")
    return dict(levels)


class _LevelAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        levels = dict(getattr(namespace, LEVELS_DEST, None) or {})
        levels[LEVEL_FLAGS[str(option_string)]] = values
        setattr(namespace, LEVELS_DEST, levels)


def extend_engine_parser(parser: Any) -> None:
    """Add `--scheduler NAME` (dest scheduler_cls) and kvsched's API-server middleware to vLLM's argument parser.

    The middleware is a strict pass-through unless the server's scheduler is kvsched's, so `vllm serve MODEL`
    without `--scheduler` behaves exactly like stock vLLM."""
    if any("--scheduler" in a.option_strings for a in parser._actions):
        return
    parser.add_argument(
        "--scheduler", dest="scheduler_cls", action=_SchedulerAction, metavar="{" + ",".join(SCHEDULERS) + "}",
        help="Scheduler by short name (added by the kvsched plugin). 'kvsched' keeps each session's KV "
             "resident between turns; 'default' is vLLM's own scheduler.",
    )
    for action in parser._actions:
        if action.dest == "scheduler_cls" and "--scheduler-cls" in action.option_strings:
            action.type = _scheduler_cls_type
    parser.add_argument(
        "--kvsched-fp8-tier-gb", dest=TIER_DEST, action=_TierAction, default=argparse.SUPPRESS,
        metavar="GIB|auto",
        help="Host memory (GiB) for kvsched's FP8 tier: KV that --scheduler kvsched releases under memory pressure is "
             "quantized to FP8 there and restored (prefetched when the session's next request is queued) instead of "
             "recomputed. Default auto: min(2x the KV pool's bytes, 1/4 of available host memory / GPUs); 0 turns it "
             "off (added by the kvsched plugin; sets --kv-transfer-config).",
    )
    for flag, metavar, text in (
            ("--kvsched-disk-tier-dir", "DIR", "Local-disk level under the FP8 tier: each turn's KV blocks are written "
             "behind to DIR (and what the tier evicts), and restored from there, e.g. after a restart on the same "
             "DIR (added by the kvsched plugin)."),
            ("--kvsched-disk-tier-gb", "GIB", "Size of the disk level (default: half the free space of DIR's file "
             "system)."),
            ("--kvsched-store-url", "redis://HOST:PORT", "Shared level: a Redis every replica of the pool reads and "
             "writes (KV blocks, session metadata, compaction summaries), so a session served elsewhere next turn "
             "keeps its KV and its summary (also KVSCHED_STORE_URL).")):
        parser.add_argument(flag, action=_LevelAction, default=argparse.SUPPRESS, metavar=metavar, help=text)
    parser.set_defaults(middleware=[MIDDLEWARE_PATH])
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


RAY_PREFIXES_VAR = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"


def carry_settings_to_ray_workers(args: argparse.Namespace) -> None:
    """With kvsched's scheduler on Ray workers: vLLM copies to them only the environment variables of its own prefixes
    (VLLM_, HF_, NCCL_, ...: `vllm/ray/ray_env.py`) and of those this variable adds, so add KVSCHED_ and a worker on
    another node runs with the engine's kvsched settings (the FP8 tier's, the shared store's URL), not the defaults.
    Additive (the operator's prefixes stay), and only then: the variable is one of vLLM's compile-cache factors, so
    setting it everywhere would miss a cache built without it (a review found that)."""
    if not is_kvsched_scheduler(getattr(args, "scheduler_cls", None)):
        return
    if "ray" not in (getattr(args, "distributed_executor_backend", None), getattr(args, "data_parallel_backend", None)):
        return
    prefixes = [p.strip() for p in os.environ.get(RAY_PREFIXES_VAR, "").split(",") if p.strip()]
    if "KVSCHED_" not in prefixes:
        os.environ[RAY_PREFIXES_VAR] = ",".join([*prefixes, "KVSCHED_"])


def _check_after_parsing(parser: Any) -> None:
    """Once the arguments are complete (whatever their order on the command line): exit with `cpu_refusal`'s one line
    or the KVSCHED_* settings errors (one line each) before vLLM starts an engine, and turn the FP8 tier on
    (`_apply_tier`)."""
    parse_known_args = parser.parse_known_args

    def checked(args: Any = None, namespace: Any = None) -> Any:
        ns, rest = parse_known_args(args, namespace)
        if (reason := cpu_refusal(ns) or parallel_refusal(ns)) is not None:
            parser.exit(2, f"kvsched: {reason}\n")
        if is_kvsched_scheduler(getattr(ns, "scheduler_cls", None)):  # KVSCHED_* settings: refused now, by name
            from kvsched.adapters.vllm.settings_check import engine_setting_errors, engine_setting_warnings

            for warning in engine_setting_warnings():  # a misspelt name: said, not refused (the prefix is not ours)
                print(f"kvsched: warning: {warning}", file=sys.stderr)
            if errors := engine_setting_errors():
                parser.exit(2, "".join(f"kvsched: {e}\n" for e in errors))
            mark_keyed_server(ns)  # before the engine core starts: it inherits the variable
        _apply_tier(parser, ns)
        carry_settings_to_ray_workers(ns)
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
    add_cli_args.__doc__ = current.__doc__
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]
