"""`kvsched tiny-model`: build (or reuse) a local random-weight Llama and tokenizer."""

from __future__ import annotations

import argparse
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


def run(args: argparse.Namespace) -> int:
    dtype = resolve_dtype(args.dtype)
    if args.out:
        path = build_model(args.out, SIZES[args.size], args.seed, dtype)
    else:
        path = ensure_tiny_model(args.size, seed=args.seed, dtype=dtype)
    print(path)
    return 0
