"""`kvsched tiny-model`: build (or reuse) a local random-weight Llama and tokenizer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvsched.tiny_model import DTYPES, SIZES, build_model, ensure_tiny_model, resolve_dtype


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "tiny-model", help="build a small random-weight Llama + BPE tokenizer locally (cached)")
    p.add_argument("--out", type=Path, default=None, help="model directory to write (default: the shared cache)")
    p.add_argument("--size", choices=sorted(SIZES), default="test", help="test: ~2M params; bench: ~50M params")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                   help="weights and config dtype; auto: the one this CPU computes fastest (bfloat16 with AVX512-BF16 "
                        "or AMX, else float32). Serve a float32 model with --dtype float32 (vLLM's auto downcasts it)")
    p.set_defaults(func=run)


STAMP = "kvsched-tiny-model.json"  # what kvsched.tiny_model.build_model writes last into a model directory
SEEDS = (-(2**63), 2**64 - 1)  # torch.manual_seed's range


def checked_out(out: Path) -> Path:
    """The directory to write: build_model replaces it whole, so one that holds anything but a tiny model is refused
    (found by review: `--out DIR` deleted every file in an existing DIR; a file there was a traceback)."""
    out = out.resolve()  # a symlink's target (build_model cannot remove a link to a directory)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and not (out / STAMP).is_file() and any(out.iterdir()):
        raise ValueError(f"--out {out} holds files that are not a tiny model (no {STAMP}): the model replaces the "
                         "directory whole; give a new or empty directory")
    return out


def run(args: argparse.Namespace) -> int:
    try:
        if not SEEDS[0] <= args.seed <= SEEDS[1]:  # found by review: a 20-digit seed was torch's OverflowError
            raise ValueError(f"--seed must be an integer from {SEEDS[0]} to {SEEDS[1]}, got {str(args.seed)[:40]}")
        dtype = resolve_dtype(args.dtype)
        if args.out:
            path = build_model(checked_out(args.out), SIZES[args.size], args.seed, dtype)
        else:
            path = ensure_tiny_model(args.size, seed=args.seed, dtype=dtype)
    except (ValueError, OSError) as exc:
        print(f"kvsched tiny-model: error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0
