"""What the FP8 tier's directory (kvsched.core.tier) hands the adapter: the keys it files blocks under and the copies
it plans between the KV pool and the tier's slots."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

Key = Hashable  # a block's content hash
Owner = Hashable  # a session key


@dataclass(frozen=True, slots=True)
class TailKey:
    """A partial block: `tokens` (fewer than a block) following the full block whose content hash is `parent`. The
    parent's hash covers every earlier token and the `cache_salt`, so a match is exactly a vLLM prefix match."""

    parent: Key
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Store:
    """Copy (quantize) the block now in KV-pool block `block_id` into tier slot `slot`; `tokens` > 0: only its first
    `tokens` rows hold KV (a session's partial last block), the rest is stale and must not be stored."""

    block_id: int
    slot: int
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Load:
    """Copy (dequantize) tier slot `slot` into KV-pool block `block_id`; every load of a step completes before that
    step's forward starts (the forward may write into the same block: a partial last block)."""

    slot: int
    block_id: int
