"""`kvsched bench agents`' reading of a run: what is attainable at all (the unbounded-memory floor, the clairvoyant
replay), the done-when gates, and the printed table."""

from __future__ import annotations

from typing import Any

from kvsched.bench.agents_naming import print_naming
from kvsched.bench.common import ratios, table

TIER_SIDE, NO_TIER_SIDE = "kvsched", "kvsched-no-tier"
KVSCHED_SIDES = (NO_TIER_SIDE, TIER_SIDE)
# Stock with a pool of the bytes of kvsched's pool and tier together (BENCH_PROTOCOL rule 1): the tier side's gates
# are judged against it when it ran. Found by review: they were judged against stock on the pool alone, a third of
# the KV memory the tier side had by default.
SAME_MEMORY_SIDE = "stock-same-memory"
MEASURED_SIDES = ("stock", NO_TIER_SIDE, TIER_SIDE, SAME_MEMORY_SIDE, "unbounded")


def invalid_reason(result: dict[str, Any], side: str) -> str | None:
    """Why `side` does not compare with the others, or None: a failed turn (its figures cover less work, and a failed
    follow-up has no TTFT), or prompt tokens other than stock's (identical on every side by construction: the replies
    are canned). Found by review: a side whose every follow-up failed passed the TTFT gate."""
    r = result[side]
    if r.get("invalid"):
        return str(r["invalid"])
    if r.get("errors"):
        return f"{r['errors']} of {r.get('turns', '?')} turns failed"
    stock = result.get("stock") or {}
    if side != "stock" and "prompt_tokens_total" in r and "prompt_tokens_total" in stock \
            and r["prompt_tokens_total"] != stock["prompt_tokens_total"]:
        return f"{r['prompt_tokens_total']} prompt tokens served, stock {stock['prompt_tokens_total']}"
    return None


def valid(result: dict[str, Any], *sides: str) -> bool:
    """Every one of `sides` ran and compares (invalid_reason)."""
    return all(side in result and invalid_reason(result, side) is None for side in sides)


def mark_invalid(result: dict[str, Any], sides: list[str]) -> dict[str, str]:
    """Sets `invalid` (the reason) on every side of `sides` that does not compare; returns side -> reason."""
    out = {}
    for side in sides:
        if side in result and (why := invalid_reason(result, side)) is not None:
            result[side]["invalid"] = out[side] = why
    return out


def compare(result: dict[str, Any], sides: list[str]) -> None:
    """Marks the sides that do not compare (mark_invalid), then each valid side's ratios to a valid stock
    (`ratio`, kvsched's also at its top level, as documented) and the tier side's to the no-tier side's."""
    mark_invalid(result, sides)
    if "stock" in result:
        result["ratio"] = {s: ratios(result[s], result["stock"]) for s in sides
                           if s != "stock" and valid(result, "stock", s)}
        if TIER_SIDE in result["ratio"]:
            result["ratio"].update(result["ratio"][TIER_SIDE])
    if valid(result, NO_TIER_SIDE, TIER_SIDE):
        result["ratio_tier_over_no_tier"] = ratios(result[TIER_SIDE], result[NO_TIER_SIDE])
    if valid(result, SAME_MEMORY_SIDE, TIER_SIDE):  # kvsched as shipped against stock with the same KV bytes
        result["ratio_same_memory"] = ratios(result[TIER_SIDE], result[SAME_MEMORY_SIDE])


def gate_base(result: dict[str, Any]) -> tuple[str, str]:
    """(side, gate-name suffix) the tier side's gates compare with: stock-same-memory when it ran, else stock on the
    pool alone, named as unequal memory."""
    if SAME_MEMORY_SIDE in result:
        return SAME_MEMORY_SIDE, "stock_same_memory"
    return "stock", "stock_unequal_memory"


def attainable(result: dict[str, Any]) -> dict[str, float]:
    """The unbounded-memory floor over stock (no eviction order at this pressure computes fewer prefill tokens than
    the floor), and each kvsched side's prefill over stock and share of the saving the floor makes possible. The tier
    holds KV beyond the pool, so the tier side may go below the floor."""
    if not valid(result, "stock", "unbounded"):
        return {}
    stock = result["stock"]["prefill_tokens_computed"]
    floor = result["unbounded"]["prefill_tokens_computed"]
    out = {"floor_over_stock": floor / stock if stock else 0.0}
    for side in KVSCHED_SIDES:
        if valid(result, side):
            ours, tag = result[side]["prefill_tokens_computed"], side.replace("-", "_")
            out[f"{tag}_over_stock"] = ours / stock if stock else 0.0
            out[f"{tag}_share_of_attainable_saving"] = (stock - ours) / (stock - floor) if stock > floor else 0.0
    return out


def clairvoyant_bound(result: dict[str, Any]) -> dict[str, float]:
    """The replays against stock's measured prefill: Belady at this pool on the kvsched-no-tier side's own arrivals
    (what no eviction order could have beaten in this run), on stock's, and the simulated LRU on stock's arrivals (the
    model's check: near 1.0 when the simulator's pool behaves like vLLM's)."""
    if not valid(result, "stock", NO_TIER_SIDE):
        return {}
    stock = result["stock"]["prefill_tokens_computed"]
    ours = result[NO_TIER_SIDE]["prefill_tokens_computed"]
    rk, rs = result[NO_TIER_SIDE].get("replay"), result["stock"].get("replay")
    if not stock or rk is None or rs is None:
        return {}
    opt = rk["opt"]
    return {"opt_over_stock": opt / stock, "opt_on_stock_arrivals_over_stock": rs["opt"] / stock,
            "sim_lru_over_stock": rs["lru"] / stock, "sim_kvsched_over_stock": rk["kvsched"] / stock,
            "no_tier_share_of_clairvoyant_saving": (stock - ours) / (stock - opt) if stock > opt else 0.0}


def prefetched_share(side: dict[str, Any]) -> float | None:
    """Of the tier's restores of full blocks, the share a prefetch started (before the request was scheduled). A
    session's partial last block (`tail_restores`, reported apart) is restored at admission by design: vLLM's prefix
    cache holds full blocks only, so a tail has nowhere to go before its request owns a block."""
    tier = side.get("tier") or {}
    return tier["prefetched_restores"] / tier["restores"] if tier.get("restores") else None


def tier_gate_names(result: dict[str, Any], prefill: float = 0.45, ttft: float = 0.3,
                    throughput: float = 1.2) -> tuple[str, str, str]:
    """The names of the tier side's three gates against its base (gate_base)."""
    _, tag = gate_base(result)
    return f"prefill_le_{prefill}x_{tag}", f"followup_ttft_p95_le_{ttft}x_{tag}", f"throughput_ge_{throughput}x_{tag}"


def gates_not_applicable(result: dict[str, Any], prefill: float = 0.45, ttft: float = 0.3,
                         throughput: float = 1.2) -> dict[str, str]:
    """Gate name -> why it does not apply to this run: the tier side's gates when their base's pool holds the whole
    working set (at least the pool of the `unbounded` side, the bench's own "holds it all": working set x
    UNBOUNDED_HEADROOM). That base then recomputes nothing an eviction order or a tier could save (it sits on the
    unbounded floor), so no tier can reach 0.45x its prefill nor gain latency over it: the comparison needs a pressure
    where the base's memory falls short. Read from the run's config (pool sizes), not from its measurements. Found by
    leftovers70: at --quick's 1.5x pressure stock-same-memory's pool (3x kvsched's) holds the working set; its three
    gates printed FAIL and the command exited 0."""
    cfg = result.get("config") or {}
    if TIER_SIDE not in result or "stock" not in result or not cfg.get("unbounded_pool_tokens"):
        return {}
    name, _ = gate_base(result)
    blocks = cfg.get("same_memory_num_blocks") if name == SAME_MEMORY_SIDE else cfg.get("num_blocks")
    if not blocks or not cfg.get("block_size"):
        return {}
    tokens, whole = blocks * cfg["block_size"], cfg["unbounded_pool_tokens"]
    if tokens < whole:
        return {}
    why = (f"not applicable ({name}'s pool of {tokens:,} tokens holds the whole working set of "
           f"{cfg.get('working_set_tokens', 0):,} tokens, at least the unbounded side's {whole:,}: it recomputes "
           f"nothing a tier could save at pressure {cfg.get('pressure', 0):.2f}x; the gates apply at a pressure where "
           f"its memory falls short, e.g. --pressure 3)")
    return {gate: why for gate in tier_gate_names(result, prefill, ttft, throughput)}


def verdict(result: dict[str, Any]) -> tuple[int, str]:
    """(exit code, the last line of the run): 1 when an applicable gate failed (naming them), else 0, with the count
    of gates not applicable."""
    g, na = result.get("gates") or {}, result.get("gates_not_applicable") or {}
    failed = [name for name, ok in g.items() if not ok]
    tail = f", {len(na)} not applicable" if na else ""
    if failed:
        return 1, f"gates: FAILED {len(failed)} of {len(g)} ({', '.join(failed)}){tail}"
    return 0, f"gates: all {len(g)} passed{tail}"


def gates(result: dict[str, Any], prefill: float = 0.45, ttft: float = 0.3, throughput: float = 1.2) -> dict[str, bool]:
    """The done-when checks of the FP8-tier issue on the kvsched side (as shipped: tier on) against stock with the
    same KV memory (gate_base), and the standing promise that kvsched without its tier (the same pool as stock) never
    computes more than stock. A comparison with a side that is not valid (invalid_reason) fails, and so does a
    missing TTFT. Gates that do not apply to the run (gates_not_applicable) are left out."""
    if "stock" not in result:
        return {}
    skip = gates_not_applicable(result, prefill, ttft, throughput)
    s = result["stock"]
    sides = [k for k in MEASURED_SIDES if k in result]
    out: dict[str, bool] = {"zero_errors": all(result[k]["errors"] == 0 for k in sides),
                            "every_side_valid": valid(result, *sides)}
    if TIER_SIDE in result:
        name, tag = gate_base(result)
        k, b, ok = result[TIER_SIDE], result[name], valid(result, name, TIER_SIDE)
        out[f"prefill_le_{prefill}x_{tag}"] = ok and _le(k["prefill_tokens_computed"], prefill,
                                                         b["prefill_tokens_computed"])
        out[f"followup_ttft_p95_le_{ttft}x_{tag}"] = ok and _le(k["followup_ttft_p95_s"], ttft,
                                                                b["followup_ttft_p95_s"])
        out[f"throughput_ge_{throughput}x_{tag}"] = ok and k["throughput_tok_s"] >= throughput * b["throughput_tok_s"]
        share = prefetched_share(k)
        out["half_of_restores_prefetched"] = valid(result, TIER_SIDE) and share is not None and share >= 0.5
    if NO_TIER_SIDE in result:
        out["no_tier_prefill_le_stock"] = valid(result, "stock", NO_TIER_SIDE) and \
            result[NO_TIER_SIDE]["prefill_tokens_computed"] <= s["prefill_tokens_computed"]
    return {name: ok for name, ok in out.items() if name not in skip}


def _le(value: float | None, factor: float, base: float | None) -> bool:
    """value <= factor x base, False when either is missing (no TTFT measured is no pass)."""
    return value is not None and base is not None and value <= factor * base


def unbounded_reach(result: dict[str, Any], ttft: float = 0.3, throughput: float = 1.2) -> dict[str, Any]:
    """What stock vLLM with a pool holding the whole working set reaches against the tier gates' base in the same run
    (gate_base): no policy saves more recompute than it, so a latency or throughput gate it misses is out of reach at
    this pressure on this engine (not a shortfall of kvsched's)."""
    name, _ = gate_base(result)
    if not valid(result, name, "unbounded"):
        return {}
    s, u = result[name], result["unbounded"]
    ttft_ratio = u["followup_ttft_p95_s"] / s["followup_ttft_p95_s"] \
        if s["followup_ttft_p95_s"] and u["followup_ttft_p95_s"] is not None else None
    thr_ratio = u["throughput_tok_s"] / s["throughput_tok_s"] if s["throughput_tok_s"] else None
    return {"base": name, "followup_ttft_p95_over_base": ttft_ratio, "throughput_over_base": thr_ratio,
            f"followup_ttft_p95_le_{ttft}x_reachable": ttft_ratio is not None and ttft_ratio <= ttft,
            f"throughput_ge_{throughput}x_reachable": thr_ratio is not None and thr_ratio >= throughput}


ROWS = ("prefill_tokens_computed", "prompt_tokens_total", "prefix_hit_rate", "ttft_p50_s", "ttft_p95_s",
        "followup_ttft_p95_s", "throughput_tok_s", "wall_s", "errors", "preemptions")


def print_report(result: dict[str, Any], show_gates: bool = True) -> None:
    sides = [s for s in MEASURED_SIDES if s in result]
    sides += [s for s in result if s.startswith("kvsched:")]  # the session-naming sides (agents_naming)
    ratio_sides = [s for s in (NO_TIER_SIDE, TIER_SIDE) if s in result.get("ratio", {})]
    same = result.get("ratio_same_memory")
    rows = []
    for key in ROWS:
        rows.append([key] + [result[s].get(key) for s in sides] + [result["ratio"][s].get(key) for s in ratio_sides]
                    + ([same.get(key)] if same else []))
    header = [f"{s}/stock" + (" (unequal memory)" if s == TIER_SIDE else "") for s in ratio_sides]
    print(table(rows, ["metric", *sides, *header] + ([f"{TIER_SIDE}/{SAME_MEMORY_SIDE}"] if same else [])))
    for side in sides:
        if result[side].get("invalid"):
            print(f"side {side} does not compare (no ratio, its gates fail): {result[side]['invalid']}")
    cfg = result["config"]
    print(f"sessions={cfg['sessions']} working_set={cfg['working_set_tokens']} tok, pool={cfg['kv_pool_tokens']} tok "
          f"(pressure {cfg['pressure']:.2f}x), model {cfg['model']['size']} {cfg['model']['dtype']}, prefill "
          f"{ {k: round(v) for k, v in cfg['measured_prefill_tok_s'].items()} } tok/s")
    if cfg.get("same_memory_pool_bytes"):
        print(f"{SAME_MEMORY_SIDE}: pool of {cfg['same_memory_pool_bytes'] / 2**20:.1f} MiB; kvsched's pool + tier "
              f"{(cfg.get('kvsched_pool_plus_tier_bytes') or 0) / 2**20:.1f} MiB (stock's pool alone "
              f"{cfg['kv_pool_bytes'] / 2**20:.1f} MiB); the tier gates compare kvsched with it")
    print_naming(result)
    b = result.get("bound", {})
    if "opt_over_stock" in b:
        print(f"clairvoyant replay of the no-tier side's arrivals at this pool (kvsched.sim): Belady "
              f"{b['opt_over_stock']:.3f}x stock's prefill (no eviction order goes below it at this memory), kvsched "
              f"without its tier realises {b['no_tier_share_of_clairvoyant_saving']:.0%} of its saving; simulated LRU "
              f"on stock's arrivals {b['sim_lru_over_stock']:.3f}x stock's measured count (the model's check)")
    if "floor_over_stock" in b:
        print(f"unbounded-memory floor = {b['floor_over_stock']:.3f}x stock prefill (no eviction order goes below it; "
              f"only KV beyond the pool, the tier, does)")
    if TIER_SIDE in result and "tier" in result[TIER_SIDE]:
        t = result[TIER_SIDE]["tier"]
        share = prefetched_share(result[TIER_SIDE])
        print(f"fp8 tier ({t['capacity_bytes'] / 2**20:.0f} MiB): {t['demoted_blocks']} blocks demoted, "
              f"{t['restores']} restores of full blocks ({t['prefetched_restores']} prefetched"
              f"{f', {share:.0%}' if share is not None else ''}; {t['wasted_prefetches']} wasted) and "
              f"{t.get('tail_restores', 0)} of partial last blocks only, "
              f"{t['restored_tokens']} tokens restored ({t.get('restored_tail_tokens', 0)} from partial last blocks), "
              f"{t['evicted_blocks']} evicted, {t['restore_misses']} misses, {t['load_failures']} checksum failures; "
              f"KV relative RMS error {t['kv_rel_rms_error']}")
        if "fidelity" in result[TIER_SIDE]:
            print(f"fidelity (restored vs recomputed, greedy): {result[TIER_SIDE]['fidelity']}")
    print_prediction(result.get("recorded_prediction") or {})
    reach = result.get("unbounded_reach") or {}
    if reach.get("throughput_over_base") is not None and reach.get("followup_ttft_p95_over_base") is not None:
        print(f"unbounded memory against {reach['base']} in this run: follow-up P95 TTFT "
              f"{reach['followup_ttft_p95_over_base']:.3f}x, throughput {reach['throughput_over_base']:.3f}x (no "
              f"policy saves more recompute: gates beyond these are out of reach at this pressure on this engine)")
    for gate, ok in (result.get("gates", {}) if show_gates else {}).items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {gate}")
    for gate, why in (result.get("gates_not_applicable", {}) if show_gates else {}).items():
        print(f"  [N/A]  {gate}: {why}")


def print_prediction(check: dict[str, Any]) -> None:
    """The recorder side's replay (agents_recorded): each measured side's prefill next to what the recording
    predicted for it."""
    rows = [[side, c["policy"], c["measured"], c["predicted"], c["predicted_over_measured"]]
            for side, c in check.items() if isinstance(c, dict)]
    if rows:
        print("predicted from the engine's recording of the recorder side (kvsched simulate at its pool) vs measured; "
              f"OPT predicted {check['opt_predicted']} tokens:")
        print(table(rows, ["side", "simulated as", "measured prefill", "predicted", "predicted/measured"]))
