"""`vllm serve` arguments for kvsched's FP8 tier and its disk and shared levels: the flags, and the kv_transfer_config
they (or KVSCHED_FP8_TIER_GB and the levels' variables) set once parsing is done."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

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


def apply_tier(parser: Any, ns: argparse.Namespace, kvsched: bool) -> None:
    """With `--scheduler kvsched` (`kvsched`) the FP8 tier is on unless told otherwise: set vLLM's kv_transfer_config to
    it (size from --kvsched-fp8-tier-gb, else KVSCHED_FP8_TIER_GB, else the default rule), unless the size is 0 or the
    command names another KV connector (then kvsched runs without its tier, and says so)."""
    from kvsched.adapters.vllm.fp8_tier_connector import ENV_TIER_GB, kv_transfer_config
    from kvsched.adapters.vllm.tier_config import CONNECTOR_NAME, hide_store_secret
    from kvsched.core.tier_config import parse_tier_gib

    asked = getattr(ns, TIER_DEST, None)
    if asked is not None:
        delattr(ns, TIER_DEST)
    levels = _take_levels(parser, ns, kvsched)
    if not kvsched:
        if asked is not None:
            parser.error("--kvsched-fp8-tier-gb needs --scheduler kvsched (the tier holds KV kvsched releases)")
        return
    if (user := getattr(ns, "kv_transfer_config", None)) is not None:
        if asked is not None or levels:
            parser.error("--kvsched-fp8-tier-gb / --kvsched-disk-tier-* / --kvsched-store-url set "
                         "--kv-transfer-config; pass only one of them")
        if getattr(user, "kv_connector", None) == CONNECTOR_NAME:
            if _prefix_caching_off(ns):
                _refuse_without_prefix_caching(parser, f"--kv-transfer-config naming {CONNECTOR_NAME}")
            _check_user_tier(parser, user)
            if getattr(user, "kv_connector_extra_config", None):
                user.kv_connector_extra_config = hide_store_secret(dict(user.kv_connector_extra_config))
        return  # the user's own connector (the tier's JSON, or another one): kvsched runs without adding its tier
    gib = parse_tier_gib(asked) if asked is not None else _env_tier_gib(parser)
    if gib != 0 and _prefix_caching_off(ns):
        _tier_off_without_prefix_caching(parser, asked, levels)
        return
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


def _prefix_caching_off(ns: argparse.Namespace) -> bool:
    """`--no-enable-prefix-caching` given (vLLM's default, None, lets vLLM decide: on, unless the model or platform
    turns it off, which the connector then says in its log)."""
    return getattr(ns, "enable_prefix_caching", None) is False


def _refuse_without_prefix_caching(parser: Any, setting: str) -> None:
    parser.exit(2, f"kvsched: {setting} needs vLLM's prefix caching (the FP8 tier and its levels are keyed by its "
                   f"block hashes), which --no-enable-prefix-caching turns off; drop one of them\n")


def _tier_off_without_prefix_caching(parser: Any, asked: Any, levels: dict[str, Any]) -> None:
    """`--no-enable-prefix-caching` with the tier on: refused in one line when the tier (or a level under it) was asked
    for by flag or variable, else the default tier is left off, with a warning. Found by review: the tier was added
    anyway, and its connector raised in the worker after the model had loaded (the engine died)."""
    from kvsched.adapters.vllm.fp8_tier_connector import ENV_TIER_GB

    if asked is not None:
        size = asked if isinstance(asked, str) else f"{asked:g}"
        _refuse_without_prefix_caching(parser, f"--kvsched-fp8-tier-gb {size}")
    if levels:
        _refuse_without_prefix_caching(parser, " / ".join(f for f, k in LEVEL_FLAGS.items() if k in levels))
    if os.environ.get(ENV_TIER_GB, "").strip():
        _refuse_without_prefix_caching(parser, f"{ENV_TIER_GB}={os.environ[ENV_TIER_GB]!r}")
    if env_levels := _env_levels():
        _refuse_without_prefix_caching(parser, " / ".join(env_levels))
    print("kvsched: warning: --no-enable-prefix-caching: kvsched's FP8 tier is off, and no session's KV is kept (its "
          "pins and its tier follow vLLM's prefix-cache block hashes)", file=sys.stderr)


def _check_user_tier(parser: Any, user: Any) -> None:
    """A --kv-transfer-config naming the tier's connector: its size (or KVSCHED_FP8_TIER_GB without one), staging,
    levels and load-failure policy checked now, as the flags are. Found by review: a bad size first failed in the
    engine, after the model loaded, inside vLLM's tracebacks and without naming the variable."""
    from kvsched.adapters.vllm.tier_config import measure_error_of, stage_bytes_of
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
        measure_error_of(extra)
        if extra.get("stage_mb") is not None:  # the staging's size (found by review: refused only in the engine)
            stage_bytes_of(extra, 0)
    except TierConfigError as exc:
        parser.error(f"--kv-transfer-config: {exc}")
    try:
        LevelsConfig.from_extra(extra, check_file_system=True)
    except (DiskConfigError, ValueError) as exc:
        parser.error(f"--kv-transfer-config kv_connector_extra_config: {exc}")
    if getattr(user, "kv_load_failure_policy", "recompute") != "recompute":
        parser.error("--kv-transfer-config: kvsched's FP8 tier needs \"kv_load_failure_policy\": \"recompute\" (a slot "
                     "that fails its checksum must be recomputed, not fail the request)")


def _env_tier_gib(parser: Any) -> float | None:
    """KVSCHED_FP8_TIER_GB (no flag gave a size) in GiB, None for auto: refused like the flag (also when larger than
    this host's memory), naming the variable, before an engine starts."""
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


def _take_levels(parser: Any, ns: argparse.Namespace, kvsched: bool) -> dict[str, Any]:
    """The --kvsched-disk-tier-* / --kvsched-store-url values given, removed from the namespace (vLLM never sees
    them); an error if given without --scheduler kvsched."""
    levels = getattr(ns, LEVELS_DEST, None) or {}
    if hasattr(ns, LEVELS_DEST):
        delattr(ns, LEVELS_DEST)
    if levels and not kvsched:
        parser.error(f"{', '.join(f for f, k in LEVEL_FLAGS.items() if k in levels)} need --scheduler kvsched")
    return dict(levels)


class _LevelAction(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        levels = dict(getattr(namespace, LEVELS_DEST, None) or {})
        levels[LEVEL_FLAGS[str(option_string)]] = values
        setattr(namespace, LEVELS_DEST, levels)



def add_tier_arguments(parser: Any) -> None:
    """`--kvsched-fp8-tier-gb` and the levels' flags, kept on the namespace until `apply_tier`."""
    parser.add_argument(
        "--kvsched-fp8-tier-gb", dest=TIER_DEST, action=_TierAction, default=argparse.SUPPRESS,
        metavar="GIB|auto",
        help="Host memory (GiB) for kvsched's FP8 tier: KV that --scheduler kvsched releases under memory pressure is "
             "quantized to FP8 there and restored (prefetched when the session's next request is queued) instead of "
             "recomputed. GIB is this host's total for the engine, shared by its tensor-parallel ranks on the host. "
             "Default auto: min(2x the KV pool's bytes, 1/4 of available host memory / GPUs or ranks on the host) per "
             "rank; 0 turns it "
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
