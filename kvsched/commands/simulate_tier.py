"""`kvsched simulate`'s FP8 tier: its size from the flags, else from the engine's KVSCHED_FP8_TIER_GB.

The engine's tier is on by default, sized "auto": min(2x the KV pool's bytes, 1/4 of the host memory available at
start-up / the GPUs on the host) (`kvsched.core.tier_config.auto_budget_bytes`). The simulator replays a trace on no
host in particular, so it has no memory to size "auto" from: without a flag its tier is off (`--fleet`: the rule on
an 8-GPU node with 2 TiB), and `--host-gib-per-gpu H` models the rule on hosts of H GiB per GPU. A size in
KVSCHED_FP8_TIER_GB is read as the engine reads it when no tier flag is given (found by review: `simulate` ignored it,
while it reads the engine's other KVSCHED_* settings), a malformed value refused as the engine refuses it (not held to
this machine's memory, as the engine's is: a replay models other hosts), and said on stderr. It is each engine's
own tier, so with `--replicas N` each replica's (found by review: it was divided among them as a flag's size, the
fleet's, is). A model the tier does not serve (MLA, sliding window) refuses a size given, but runs without a tier
--fleet's rule would size (found by review: refused "give no tier flag" when none was given)."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping

from kvsched.bench.args import MAX_GIB
from kvsched.core.env import env_setting
from kvsched.core.tier_config import ENV_TIER_GB, TierConfigError, auto_budget_bytes, parse_tier_gib

# The fleet's default host: an 8-GPU H100 node with 2 TiB of host memory (256 GiB per GPU)
FLEET_HOST_GIB_PER_GPU = 256.0
# The replay keeps a Python free list of the tier's slots: 2**26 (64 GiB of list) is 20x the fleet trace's working set,
# and a tier past a trace's working set changes nothing.
MAX_TIER_BLOCKS = 2**26


def tier_from_env(args: argparse.Namespace, say: Callable[[str], None],
                  environ: Mapping[str, str] | None = None) -> None:
    """No tier flag given: KVSCHED_FP8_TIER_GB's size becomes `--fp8-tier-gib` (ValueError naming the variable for a
    value the engine refuses); its `auto` leaves the simulator's own default, with a line saying why."""
    if args.fp8_tier_gib is not None or args.fp8_tier_blocks is not None or args.host_gib_per_gpu is not None:
        return
    raw = env_setting(os.environ if environ is None else environ, ENV_TIER_GB)
    if raw is None:
        return
    try:
        gib = parse_tier_gib(raw)
    except TierConfigError as exc:
        raise ValueError(f"{ENV_TIER_GB}={raw!r}: {str(exc).replace('--kvsched-fp8-tier-gb', ENV_TIER_GB)}") from None
    if gib is None:
        say(f"{ENV_TIER_GB}={raw!r}: the engine sizes an auto tier from its host's memory, which a replay has not; the "
            f"tier stays {'as --fleet sizes it' if args.fleet else 'off'} (give --host-gib-per-gpu H to model auto)")
        return
    args.fp8_tier_gib, args.fp8_tier_from_env = gib, True
    say(f"the FP8 tier: {f'{gib:g} GiB' if gib else 'off'} from {ENV_TIER_GB}, each replica's as it is each "
        f"engine's (no tier flag given)")


def from_env(args: argparse.Namespace) -> bool:
    """The tier's size came from KVSCHED_FP8_TIER_GB (`tier_from_env`): each replica's, not the fleet's."""
    return bool(getattr(args, "fp8_tier_from_env", False))


def tier_source(args: argparse.Namespace, replicas: int) -> str:
    """What sized the tier, for the report's line: the engine's rule (per GPU), KVSCHED_FP8_TIER_GB (each replica's)
    or a flag (the fleet's, 1/N on each of N replicas)."""
    host = rule_host_gib(args)
    if host is not None:
        return f"host {host:g} GiB per GPU of {args.gpu_kv_gib:g} GiB KV"
    if from_env(args):
        return f"{ENV_TIER_GB}: each replica's, as each engine's"
    flag = "--fp8-tier-blocks" if args.fp8_tier_blocks is not None else "--fp8-tier-gib"
    return f"{flag}: the fleet's, 1/{replicas} on each replica" if replicas > 1 else flag


def tier_bytes(args: argparse.Namespace, block_bytes: int, pool_bytes: int = 0) -> int:
    """The kvsched side's tier in bytes: --host-gib-per-gpu's rule, --fp8-tier-blocks, --fp8-tier-gib, or off (the
    fleet: its hosts' rule)."""
    host = rule_host_gib(args)
    if host is not None:
        gpu_pool = int(args.gpu_kv_gib * 2**30) if 0 < args.gpu_kv_gib <= MAX_GIB else 0
        if not 0 <= host <= MAX_GIB or gpu_pool < 1:
            raise ValueError(f"--host-gib-per-gpu must be in 0..{MAX_GIB:g} and --gpu-kv-gib at least a byte")
        gpus = max(1, math.ceil(pool_bytes / gpu_pool))
        return gpus * auto_budget_bytes(min(gpu_pool, pool_bytes), int(host * 2**30))
    if args.fp8_tier_blocks is not None:
        if not 0 <= args.fp8_tier_blocks <= MAX_TIER_BLOCKS:
            raise ValueError(f"--fp8-tier-blocks must be in 0..{MAX_TIER_BLOCKS}")
        return args.fp8_tier_blocks * block_bytes
    gib = args.fp8_tier_gib or 0.0
    if not 0 <= gib <= MAX_GIB:
        raise ValueError(f"--fp8-tier-gib must be a number in 0..{MAX_GIB:g}")
    return int(gib * 2**30)


class NoTierBlockBytes(ValueError):
    """A tier asked for on a model the FP8 tier does not serve (MLA, sliding window), whose tier block size is not
    known: refused rather than sized by another model's."""


def rule_host_gib(args: argparse.Namespace) -> float | None:
    """Host GiB per GPU when the tier is sized by the engine's rule (--host-gib-per-gpu, or --fleet's hosts when no
    size is given), else None."""
    if args.host_gib_per_gpu is not None:
        return float(args.host_gib_per_gpu)
    if args.fleet and args.fp8_tier_blocks is None and args.fp8_tier_gib is None:
        return FLEET_HOST_GIB_PER_GPU
    return None


def sized_tier(args: argparse.Namespace, block_bytes: int | None, pool_bytes: int, replicas: int = 1,
               say: Callable[[str], None] = print) -> tuple[int, int]:
    """(bytes, bytes per block) of one replica's tier on the kvsched side, (0, 0) when off; `pool_bytes` is one
    replica's pool. A flag's size (--fp8-tier-gib, --fp8-tier-blocks) is the fleet's, like the pool's, and each of
    `replicas` gets 1/N of it (found by review: each got all of it); KVSCHED_FP8_TIER_GB's is each engine's own, so
    each replica's; the engine's rule is per GPU, sized on the replica's pool. When `block_bytes` is None
    (`simulate.engine_bytes`: a recording whose header has no tier figure, a preset the tier does not serve),
    NoTierBlockBytes for a size given; a tier only --fleet's rule sizes is left off, with a line on `say`."""
    if block_bytes is None:
        if tier_bytes(args, 1, pool_bytes) > 0:
            if args.host_gib_per_gpu is None and rule_host_gib(args) is not None:
                say("--fleet's hosts would size an FP8 tier, but the FP8 tier does not serve this model (its tier "
                    "block size is not known: MLA, sliding window): the kvsched side runs without the tier")
                return 0, 0
            raise NoTierBlockBytes(
                "an FP8 tier was asked for, but this model's tier block size is not known (a recording without "
                "meta.fp8_tier_block_bytes, or a preset the FP8 tier does not serve: MLA, sliding window); give no "
                f"tier flag ({ENV_TIER_GB} unset or 0) or a --preset the tier serves")
        return 0, 0
    size = tier_bytes(args, block_bytes, pool_bytes)
    if rule_host_gib(args) is None and not from_env(args):
        size //= replicas
    return (size, block_bytes) if size > 0 else (0, 0)
