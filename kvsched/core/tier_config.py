"""The FP8 tier's size: its configuration, the default rule (from the KV pool and the host's memory) and the checks
that refuse a size this machine cannot hold, each naming the setting."""

from __future__ import annotations

from dataclasses import dataclass

ENV_TIER_GB = "KVSCHED_FP8_TIER_GB"  # the tier's size when no flag gives one (the engine's, and `kvsched simulate`'s)


class TierConfigError(ValueError):
    """The tier was configured with an impossible size (raised at start-up, with the offending value)."""


# The tier's size when none is given (`vllm serve MODEL --scheduler kvsched`): at most this multiple of the KV pool's
# own bytes (FP8 takes half a bf16 pool's bytes per token and a quarter of a float32 pool's, so 2x holds about four
# pools of KV from a bf16 pool, eight from a float32 one, as on a CPU without native bf16) and at most this share of
# the host memory available at start-up, split between the engines (GPUs) of the machine. Host memory is taken as the
# tier fills, so an idle tier costs nothing.
AUTO_POOL_MULTIPLE = 2.0
AUTO_HOST_FRACTION = 0.25


def auto_budget_bytes(pool_bytes: int, host_available_bytes: int, engines_per_host: int = 1) -> int:
    """The default tier budget: min(2 x the KV pool's bytes, 1/4 of available host memory / engines on the host)."""
    share = AUTO_HOST_FRACTION * max(host_available_bytes, 0) / max(engines_per_host, 1)
    return int(max(0.0, min(AUTO_POOL_MULTIPLE * max(pool_bytes, 0), share)))


def parse_tier_gib(value: object) -> float | None:
    """A tier size as given on the command line or in the environment: GiB (>= 0; 0 turns the tier off), or None
    for `auto` (the default rule). TierConfigError names the value otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    return TierConfig.from_gib(value).budget_bytes / 2**30


def check_fits_host(budget_bytes: int, host_total_bytes: int) -> None:
    """Refuse a tier larger than this machine's memory: it could never be filled without the OS killing the engine."""
    if host_total_bytes > 0 and budget_bytes > host_total_bytes:
        raise TierConfigError(f"a tier of {budget_bytes / 2**30:.1f} GiB exceeds this machine's host memory "
                              f"({host_total_bytes / 2**30:.1f} GiB); give --kvsched-fp8-tier-gb a smaller size")


TIER_EVICTION_ORDERS = ("recency", "value")


@dataclass(frozen=True, slots=True)
class TierConfig:
    """budget_bytes: host memory the tier may hold (slots x bytes per block); 0 disables the tier.
    remember_evicted: how many evicted block keys are remembered to count restore misses (bounded).
    eviction: which session's blocks leave a full tier first: `recency` (the session whose blocks entered the tier
    longest ago) or `value` (the pins' retention value, lowest first, and never for a session worth less). Recency
    is the default: it kept more of what came back on every trace measured (BENCHMARKS, issue 24's trace table)."""

    budget_bytes: int
    remember_evicted: int = 100_000
    eviction: str = "recency"

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise TierConfigError(f"tier budget must be >= 0 bytes, got {self.budget_bytes}")
        if self.eviction not in TIER_EVICTION_ORDERS:
            raise TierConfigError(f"tier eviction must be one of {', '.join(TIER_EVICTION_ORDERS)}, got {self.eviction!r}")
        if self.remember_evicted < 0:
            raise TierConfigError("remember_evicted must be >= 0")

    @classmethod
    def from_gib(cls, gib: object) -> TierConfig:
        """GiB as given. Found by review: JSON `true` was taken as 1 GiB, and a size under one byte (1e-12) as 0, the
        tier off, without a word: both refused."""
        try:
            if isinstance(gib, bool):
                raise TypeError
            value = float(gib)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise TierConfigError(f"tier size must be a number of GiB, got {gib!r}") from None
        if not value >= 0 or value == float("inf"):
            raise TierConfigError(f"tier size must be a finite number of GiB >= 0, got {gib!r}")
        if 0 < value and int(value * 2**30) == 0:
            raise TierConfigError(f"tier size {gib!r} GiB is less than a byte; give 0 to turn the tier off")
        return cls(budget_bytes=int(value * 2**30))
