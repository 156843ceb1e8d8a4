"""How an engine's ranks share each KV block, for its byte figures (the FP8 tier's gauges and slots, KV bytes per
token).

Under tensor parallelism each rank holds its heads of every layer; under pipeline parallelism each stage holds its own
layers, split as vLLM splits the model's hidden layers (`vllm.distributed.utils.get_pp_indices`: even, the remainder on
the middle then the early stages, or `VLLM_PP_LAYER_PARTITION`; the adapter reads it from vLLM, this module only
counts). What the scheduler measures is the first rank's (its KV cache spec is rank 0's: stage 0's layers), and every
hidden layer's KV is alike, so a stage's share is the first rank's times its layers over stage 0's. Found by review:
every stage was counted with stage 0's layers: 3.7% high for 27 layers in two stages (14 + 13 counted as 14 + 14), 6.7%
low for 30 layers in four (7, 8, 8, 7 counted as 4 x 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

Num = TypeVar("Num", int, float)


@dataclass(frozen=True, slots=True)
class RankShares:
    """An engine of `world_size` ranks (tensor x pipeline x context parallel) in `len(stage_layers)` pipeline stages,
    stage s holding `stage_layers[s]` hidden layers on each of its `world_size / stages` ranks; no `stage_layers`: one
    stage. Byte figures are given as the first rank's; integers stay integers (floored)."""

    world_size: int = 1
    stage_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # A later stage holding no layer is counted as holding no KV (0 bytes), never a division by zero; vLLM 0.32
        # cannot serve such a partition (`partition_refusal`), so only a future vLLM would bring one here. Stage 0
        # may not: every figure is scaled from its rank's measurement.
        if self.world_size < 1 or any(n < 0 for n in self.stage_layers) or self.stage_layers[:1] == (0,):
            raise ValueError(f"a world of {self.world_size} ranks, stages of {self.stage_layers} layers: at least one "
                             "rank, no stage below 0 layers, stage 0 (whose rank the figures are measured on) >= 1")
        if self.world_size % self.stages:
            raise ValueError(f"{self.world_size} ranks do not split into {self.stages} pipeline stages")

    @property
    def stages(self) -> int:
        return max(len(self.stage_layers), 1)

    def _scaled(self, first_rank: Num, layers: int) -> Num:
        """`first_rank` (stage 0's) for a rank holding `layers` layers."""
        if not self.stage_layers:
            return first_rank
        if isinstance(first_rank, int):
            return first_rank * layers // self.stage_layers[0]
        return first_rank * layers / self.stage_layers[0]

    def engine(self, first_rank: Num) -> Num:
        """Every rank's share summed: each stage's ranks times their layers' bytes."""
        return self._scaled(first_rank * (self.world_size // self.stages), sum(self.stage_layers))

    def largest_rank(self, first_rank: Num) -> Num:
        """The share of the rank(s) holding the most layers: what the most loaded worker takes."""
        return self._scaled(first_rank, max(self.stage_layers, default=0))

    def rank_bytes(self, first_rank: int) -> tuple[tuple[int, int], ...]:
        """(ranks, each one's bytes) of every pipeline stage."""
        tensor = self.world_size // self.stages
        stages = tuple((tensor, self._scaled(first_rank, n)) for n in self.stage_layers)
        return stages or ((self.world_size, first_rank),)

    def first_rank_budget(self, rank_budget: int, host_ranks: int) -> int:
        """The tier's budget counted in the first rank's bytes, for slots every rank holds a share of: with every rank
        on this host (`host_ranks`), slots whose engine bytes fit the host's `rank_budget x host_ranks`; else slots
        that keep the rank holding the most layers within `rank_budget` (a host's ranks may be any stage's). Found by
        review: slots were sized by the first rank's bytes alone, so an engine whose later stage holds more layers
        took more than the size given."""
        if not self.stage_layers:
            return rank_budget
        if host_ranks >= self.world_size:
            tensor = self.world_size // self.stages
            return rank_budget * self.world_size * self.stage_layers[0] // (tensor * sum(self.stage_layers))
        return rank_budget * self.stage_layers[0] // max(self.stage_layers)

    def host_budget_for(self, first_rank: int, host_ranks: int) -> int:
        """The smallest host size (`rank_budget x host_ranks`, what --kvsched-fp8-tier-gb gives) whose
        `first_rank_budget` holds `first_rank` bytes: one slot of a block of them. Found by review: the tier's warning
        for a size holding no slot asked for the first rank's block on each rank, which holds none when a later stage
        has more layers or the stages' sum exceeds the first's times their number."""
        if not self.stage_layers:
            return first_rank * host_ranks
        if host_ranks >= self.world_size:
            tensor = self.world_size // self.stages
            need, per = first_rank * tensor * sum(self.stage_layers), self.world_size * self.stage_layers[0]
        else:
            need, per = first_rank * max(self.stage_layers), self.stage_layers[0]
        return -(-need // per) * host_ranks  # each rank's budget rounded up to the whole byte that holds the slot


PARTITION_ENV = "VLLM_PP_LAYER_PARTITION"


def partition_refusal(raw: str | None, stages: int) -> str | None:
    """Why vLLM 0.32 cannot serve `VLLM_PP_LAYER_PARTITION=raw` on `stages` pipeline stages, in one line, or None
    (unset, or one it serves as far as can be told without the model: the layers' sum is vLLM's to check). Malformed or
    mis-sized: vLLM's own words (`vllm.distributed.utils.get_pp_indices`), said before the engine starts, not by its
    workers. A stage of 0 layers: `get_pp_indices` and `make_layers` accept it, but the engine core then cannot size
    the KV cache of a rank holding no attention layer (`get_kv_cache_configs`: ZeroDivisionError under the CPU
    backend's LBHNC layout, AssertionError under block-outer ones; checked on vLLM 0.32's own function, both 2,0 and
    0,2 for a 2-layer model), so the server died after loading the model, with a traceback naming none of this."""
    if raw is None:
        return None
    where = f"{PARTITION_ENV}={raw!r}"
    try:
        partitions = [int(layer) for layer in raw.split(",")]
    except ValueError:
        return (f"{where}: Invalid partition string: {raw} (vLLM's get_pp_indices; one layer count per stage, "
                "e.g. 14,13)")
    if len(partitions) != stages:
        return f"{where}: len(partitions)={len(partitions)} does not match pp_size={stages} (vLLM's get_pp_indices)"
    empty = [s for s, n in enumerate(partitions) if n <= 0]
    if empty:
        return (f"{where} gives pipeline stage {empty[0]} {partitions[empty[0]]} layers: vLLM 0.32 cannot size the KV "
                f"cache of a stage without attention layers (its get_kv_cache_configs fails at start-up); give every "
                f"stage at least one layer")
    return None
