"""`kvsched bench router`'s option checks, run before any fleet is simulated or Ray cluster started."""

from __future__ import annotations

import argparse

from kvsched.bench.args import check_args, check_out_path, count, number, only_apply, seed

# SimConfig's floors (2 replicas, 100 turns); the ceilings keep a typo from running for days
LIMITS = {"replicas": count(2, 4096), "sessions": count(1, 10**7), "turns": count(100, 10**9),
          "load_factor": number(1, 100, low_open=True), "in_flight_per_replica": number(0, 1e6, low_open=True),
          "seed": seed(), "real_sessions": count(1, 10**4), "real_duration": number(0, 1e6, low_open=True),
          "real_period": number(0, 1e6, low_open=True), "kill_at": number(0, 1e6)}


def check(args: argparse.Namespace) -> None:
    """The options, before any fleet is simulated or Ray cluster started (found by review: --replicas, --sessions or
    --turns -1 or 0 and --load-factor -1, 0 or nan were tracebacks). --load-factor is the router's c (> 1)."""
    check_args(args, **LIMITS)
    if args.replicas and len(set(args.replicas)) < len(args.replicas):  # the JSON keys its rows by fleet size
        raise ValueError(f"--replicas names a size twice: {' '.join(map(str, args.replicas))}")
    if args.migration_only and not args.real:  # else ignored: the simulated fleets ran instead
        raise ValueError(only_apply(["--migration-only"], "with --real"))
    check_out_path("--out", args.out)
