"""The GPU catalogue of `kvsched plan`: a TOML file of `[[gpu]]` tables (name, vram_gib, price_per_hour, optional
interactions_per_hour and fp8_kv); the packaged default is kvsched/assets/gpus.toml, users pass their own to change
memory sizes and prices."""

from __future__ import annotations

import tomllib
from pathlib import Path

from kvsched.core.planner import PlanError
from kvsched.core.planner_fleet import Gpu

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "assets" / "gpus.toml"


def load_catalog(path: str | Path | None = None) -> list[Gpu]:
    source = Path(path) if path is not None else DEFAULT_CATALOG
    try:
        data = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"cannot read GPU catalogue {source}: {exc}") from None
    gpus: list[Gpu] = []
    for i, row in enumerate(data.get("gpu", [])):
        try:
            gpu = Gpu(name=str(row["name"]), vram_gib=float(row["vram_gib"]), price_per_hour=float(row["price_per_hour"]),
                      interactions_per_hour=float(row.get("interactions_per_hour", 22_000)),
                      fp8_kv=bool(row.get("fp8_kv", True)))
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{source}: gpu #{i + 1} needs name, vram_gib and price_per_hour ({exc})") from None
        if gpu.vram_gib <= 0 or gpu.price_per_hour < 0 or gpu.interactions_per_hour <= 0:
            raise PlanError(f"{source}: gpu {gpu.name!r} has a non-positive size, price or capacity")
        gpus.append(gpu)
    if not gpus:
        raise PlanError(f"{source}: no [[gpu]] entries")
    return gpus
