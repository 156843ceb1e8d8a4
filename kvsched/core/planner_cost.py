"""Managed API versus GPUs: the sizing guide's cost crossover.

With T tokens per interaction, P_api $ per million tokens, P_gpu $ per GPU-hour and I_gpu interactions a GPU serves
per hour at sustained load, the GPU wins per interaction when `P_api x T / 1e6 > P_gpu / I_gpu`. A dedicated GPU is
paid for every hour, so it only beats the API above `P_gpu / (P_api x T / 1e6)` interactions per hour: that load as a
share of I_gpu is the utilisation below which the API is cheaper.

The catalogue's I_gpu describes one GPU serving an 8B-class model. For another model the unit is one replica (its
tensor-parallel GPUs, paid together) and its rate is scaled by `replica_interactions_per_hour`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsched.core.planner import PlanError

REFERENCE_PARAMS = 8.03e9  # Llama 3.1 8B: the 8B-class model the catalogue's interactions_per_hour describe


def replica_interactions_per_hour(gpu_rate: float, tensor_parallel: int, params_per_token: float) -> float:
    """Interactions/h one replica of `tensor_parallel` GPUs sustains, from the catalogue's 8B-class rate per GPU.

    Decode at load is bound by memory bandwidth: each step reads every active weight once, so a replica's token rate
    scales with its GPUs' combined bandwidth (x tensor_parallel) over the weights a decode step reads
    (REFERENCE_PARAMS / params_per_token; a MoE model's: ModelShape.params_per_step at the replica's batch). A
    first-order estimate (found by review: the 8B figure was used for every model): it leaves out tensor
    parallelism's all-reduce (optimistic at TP > 1), the weight dtype, the context length and prefill; measure the
    model before buying. A parameter count of 0 (unknown) keeps the 8B-class figure."""
    if tensor_parallel <= 0 or not gpu_rate > 0 or not params_per_token >= 0:
        raise PlanError("the replica rate needs a positive GPU rate and TP degree, and params_per_token >= 0")
    scale = REFERENCE_PARAMS / params_per_token if params_per_token else 1.0
    return gpu_rate * tensor_parallel * scale


@dataclass(frozen=True, slots=True)
class Cost:
    """Managed API versus GPUs for `interactions_per_hour` interactions of `tokens_per_interaction` tokens."""

    api_per_hour: float
    gpu_prorated_per_hour: float  # the GPU's price times the share of its capacity the load uses
    gpu_dedicated_per_hour: float  # whole GPUs, paid whether busy or not
    api_per_1k_interactions: float
    gpu_per_1k_interactions: float  # at sustained load
    gpu_wins: bool  # P_api x T / 1e6 > P_gpu / I_gpu
    breakeven_interactions_per_hour: float  # above this, a dedicated GPU costs less than the API
    breakeven_utilisation: float  # the same as a share of the GPU's capacity: below it the API is cheaper


def check_figures(zero_ok: bool = False, **figures: float) -> None:
    """Each figure finite and > 0 (>= 0 with `zero_ok`), else a PlanError naming it (found by review: a catalogue
    price of 0 passed the catalogue, then failed here with a message naming no field)."""
    for name, value in figures.items():
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
            raise PlanError(f"{name} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def cost(tokens_per_interaction: float, interactions_per_hour: float, api_price_per_m: float, gpu_price_per_hour: float,
         gpu_interactions_per_hour: float) -> Cost:
    check_figures(tokens_per_interaction=tokens_per_interaction, api_price_per_m=api_price_per_m,
                  gpu_price_per_hour=gpu_price_per_hour, gpu_interactions_per_hour=gpu_interactions_per_hour)
    check_figures(zero_ok=True, interactions_per_hour=interactions_per_hour)
    api_each = api_price_per_m * tokens_per_interaction / 1e6
    gpu_each = gpu_price_per_hour / gpu_interactions_per_hour
    if api_each <= 0 or not math.isfinite(gpu_each):  # products that underflow or overflow: no answer, not inf
        raise PlanError("the API price per interaction or the GPU's cost per interaction is out of range")
    breakeven = gpu_price_per_hour / api_each
    gpus_needed = max(1, -(-interactions_per_hour // gpu_interactions_per_hour))
    return Cost(api_per_hour=interactions_per_hour * api_each, gpu_prorated_per_hour=interactions_per_hour * gpu_each,
                gpu_dedicated_per_hour=gpus_needed * gpu_price_per_hour,
                api_per_1k_interactions=1000 * api_each, gpu_per_1k_interactions=1000 * gpu_each,
                gpu_wins=api_each > gpu_each, breakeven_interactions_per_hour=breakeven,
                breakeven_utilisation=breakeven / gpu_interactions_per_hour)


@dataclass(frozen=True, slots=True)
class FleetCost:
    """A sized fleet (whole GPUs, paid every hour) against the API serving the same tokens."""

    gpus: int
    fleet_per_hour: float
    api_per_hour: float
    fleet_per_1k_interactions: float | None  # None without traffic
    api_per_1k_interactions: float
    fleet_wins: bool
    api_over_fleet: float  # > 1: the fleet is that many times cheaper


def fleet_cost(gpus: int, gpu_price_per_hour: float, interactions_per_hour: float, tokens_per_interaction: float,
               api_price_per_m: float) -> FleetCost:
    """E.g. the guide's 1,000 sessions x 200 tokens/min on 4 H100s: API $4.80/h vs $9.60/h (the API wins)."""
    check_figures(gpus=gpus, gpu_price_per_hour=gpu_price_per_hour, tokens_per_interaction=tokens_per_interaction,
                  api_price_per_m=api_price_per_m)
    check_figures(zero_ok=True, interactions_per_hour=interactions_per_hour)
    fleet = gpus * gpu_price_per_hour
    api_each = api_price_per_m * tokens_per_interaction / 1e6
    api = interactions_per_hour * api_each
    return FleetCost(gpus=gpus, fleet_per_hour=fleet, api_per_hour=api,
                     fleet_per_1k_interactions=1000 * fleet / interactions_per_hour if interactions_per_hour else None,
                     api_per_1k_interactions=1000 * api_each, fleet_wins=fleet < api,
                     api_over_fleet=api / fleet)
