"""One step's work for the levels under the FP8 host tier, from the scheduler (tier_levels) to the workers
(tier_levels_worker): the copies to make, the slots to fill, the files and keys to delete."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DISK, SHARED = "disk", "shared"
SHARED_PUT = "shared_put"  # a worker's report: its put of this block to the shared store failed or was dropped


@dataclass(frozen=True, slots=True)
class Publish:
    """Copy pool block `block_id` (content key `key`) to the disk level and/or the shared store."""

    key: bytes
    block_id: int
    disk: bool
    shared: bool


@dataclass(frozen=True, slots=True)
class Spill:
    """Copy host slot `slot` (holding `key`, evicted from the host tier this step) to the disk level."""

    key: bytes
    slot: int


@dataclass(frozen=True, slots=True)
class Fetch:
    """Fill host slot `slot` with block `key` from `source` (DISK or SHARED); given up unread if still queued on the
    worker `keep_s` seconds after it got it (tier_fetches.FetchBook.started: when the scheduler stops counting on
    it)."""

    key: bytes
    slot: int
    source: str
    keep_s: float = math.inf


@dataclass
class LevelOps:
    """One step's lower-level work, scheduler -> workers. Workers queue deletes first (a key deleted and written
    again in one step keeps its new file), then spills (they read slots this step's stores and fetches may
    overwrite), then publishes, then (after the tier's stores) fetches."""

    spills: list[Spill] = field(default_factory=list)
    publishes: list[Publish] = field(default_factory=list)
    fetches: list[Fetch] = field(default_factory=list)
    deletes: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.spills or self.publishes or self.fetches or self.deletes)
