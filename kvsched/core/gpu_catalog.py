"""The GPU catalogue of `kvsched plan`: a TOML file of `[[gpu]]` tables (name, vram_gib, price_per_hour, optional
interactions_per_hour and fp8_kv); the packaged default is kvsched/assets/gpus.toml, users pass their own to change
memory sizes and prices."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from kvsched.core.planner import PlanError
from kvsched.core.planner_fleet import Gpu

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "assets" / "gpus.toml"


MAX_VRAM_GIB = 2**20  # a pebibyte of memory on one GPU: past it, a typo


def load_catalog(path: str | Path | None = None) -> list[Gpu]:
    source = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: TOMLDecodeError, or bytes that are not UTF-8
        raise PlanError(f"cannot read GPU catalogue {source}: {exc}") from None
    rows = data.get("gpu", [])
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise PlanError(f"{source}: `gpu` must be a list of [[gpu]] tables, got {rows!r:.60}")
    gpus = [_gpu(row, f"{source}: gpu #{i + 1}") for i, row in enumerate(rows)]
    if not gpus:
        raise PlanError(f"{source}: no [[gpu]] entries")
    names = [g.name for g in gpus]
    if len(set(names)) < len(names):  # --cost-gpu would pick the last one silently
        raise PlanError(f"{source}: GPU {next(n for n in names if names.count(n) > 1)!r} is listed twice")
    return gpus


def _gpu(row: dict[str, Any], where: str) -> Gpu:
    """One [[gpu]] table, its numbers checked finite and in range (TOML allows nan and inf)."""
    try:
        name = row["name"]
        vram = _number(row, "vram_gib", where, 0, MAX_VRAM_GIB)
        price = _number(row, "price_per_hour", where, 0, 1e9)  # 0 priced an owned GPU nowhere (found by review)
        rate = _number(row, "interactions_per_hour", where, 1, 1e12, low_open=False, default=22_000)  # < 1: a fleet of
        # 1e302 GPUs, or math.ceil(inf) (found by review)
    except KeyError as exc:
        raise PlanError(f"{where} needs name, vram_gib and price_per_hour (lacks {exc.args[0]!r})") from None
    fp8_kv = row.get("fp8_kv", True)
    if not isinstance(name, str) or not isinstance(fp8_kv, bool):
        raise PlanError(f"{where}: name must be a string and fp8_kv true or false")
    return Gpu(name=name, vram_gib=vram, price_per_hour=price, interactions_per_hour=rate, fp8_kv=fp8_kv)


def _number(row: dict[str, Any], key: str, where: str, low: float, high: float, low_open: bool = True,
            default: float | None = None) -> float:
    value = row[key] if default is None else row.get(key, default)
    if type(value) not in (int, float) or not (low < value if low_open else low <= value) or not value <= high:
        raise PlanError(f"{where}: {key} must be a finite number {'>' if low_open else '>='} {low} and <= {high:.10g}, "
                        f"got {value!r:.40}")
    return float(value)
