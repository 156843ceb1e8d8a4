"""How `kvsched bench agents` names each agent's session (`--session-header`): the same workload, the same server,
only the request fields differ.

- header: `X-Session-Id`, `X-Agent-Role`, `X-Session-TTL` on every turn and `X-Session-End` on the last (the side
  called `kvsched`);
- prompt_cache_key: OpenAI's `prompt_cache_key` only, as a client written for OpenAI's API sends it (`kvsched:prompt_cache_key`);
- none: no session field at all: kvsched infers the sessions from the prompts (`kvsched:none`).

The naming sides run kvsched; their prefill saving over stock is compared with the header side's in the same run.
"""

from __future__ import annotations

import argparse
from typing import Any

NAMINGS = ("header", "none", "prompt_cache_key")
HEADER_SIDE = "kvsched"


def parse_namings(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in NAMINGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown session naming(s) {unknown or text!r}; choose from "
                                         f"{', '.join(NAMINGS)}")
    return list(dict.fromkeys(names))


def side_name(naming: str) -> str:
    return HEADER_SIDE if naming == "header" else f"{HEADER_SIDE}:{naming}"


def naming_of(side: str) -> str:
    return side.split(":", 1)[1] if side.startswith(HEADER_SIDE + ":") else "header"


def with_naming_sides(sides: list[str], namings: list[str]) -> list[str]:
    """The run's sides plus one kvsched side per naming other than the header (after `kvsched`, which it is compared
    with, when that side runs)."""
    extra = [side_name(n) for n in namings if n != "header"]
    return list(dict.fromkeys([*sides, *extra]))


def session_fields(naming: str, session_id: str, role: str, ttl_s: float, last: bool) -> tuple[dict[str, str],
                                                                                              dict[str, Any]]:
    """(extra headers, extra body fields) of one turn."""
    if naming == "prompt_cache_key":
        return {}, {"prompt_cache_key": session_id}
    if naming == "none":
        return {}, {}
    headers = {"X-Session-Id": session_id, "X-Agent-Role": role, "X-Session-TTL": str(ttl_s)}
    if last:
        headers["X-Session-End"] = "1"
    return headers, {}


def saving_shares(result: dict[str, Any]) -> dict[str, float]:
    """Each naming side's prefill saving over stock as a share of the header side's saving (stock - side)."""
    if "stock" not in result or HEADER_SIDE not in result:
        return {}
    stock = result["stock"]["prefill_tokens_computed"]
    header = stock - result[HEADER_SIDE]["prefill_tokens_computed"]
    return {side: (stock - result[side]["prefill_tokens_computed"]) / header if header > 0 else 0.0
            for side in result if side.startswith(HEADER_SIDE + ":") and isinstance(result[side], dict)
            and "prefill_tokens_computed" in result[side]}


def add_naming_gates(result: dict[str, Any]) -> None:
    """Issue 19's gate per naming side: at least 0.9x the header side's prefill saving, with 0 errors."""
    for side, share in saving_shares(result).items():
        result.setdefault("naming_saving_share", {})[side] = share
        comparable = not any(result[s].get("invalid") for s in ("stock", HEADER_SIDE, side))  # agents_report.valid
        result.setdefault("gates", {})[f"{side}_saving_ge_0.9x_header"] = share >= 0.9 and result[side]["errors"] == 0 \
            and comparable


def print_naming(result: dict[str, Any]) -> None:
    for side, share in result.get("naming_saving_share", {}).items():
        how = "by no field (inferred)" if naming_of(side) == "none" else f"by {naming_of(side)}"
        print(f"{side}: prefill saving over stock = {share:.3f}x the header side's (sessions named {how})")
