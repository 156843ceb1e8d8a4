"""Renders kvsched's scheduler statistics as Prometheus `kvsched_*` metrics for vLLM's `/metrics`."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_latest_openmetrics

from kvsched.adapters.vllm.tier_fetches import STUCK_AFTER_S
from kvsched.core.retention_records import ReleaseReason

GAUGES = {
    "active_sessions": "Sessions in kvsched's session table: running, pinned and idle ones alike (an idle session "
                       "stays until it ends or the table is trimmed past KVSCHED_MAX_SESSIONS)",
    "pinned_sessions": "Sessions whose KV is pinned between turns",
    "pinned_blocks": "KV blocks held by session pins",
    "pin_budget_blocks": "Most KV blocks pins may hold",
    "kv_bytes_per_token": "KV bytes per token across layers, from the engine's KV cache spec (follows "
                          "--kv-cache-dtype), every rank's share summed under tensor/pipeline parallelism (as the "
                          "tier's byte gauges)",
    "kv_rank_bytes_per_token": "One rank's share of kv_bytes_per_token (the first rank's: its heads of the first "
                               "pipeline stage's layers; the byte cost eviction scores use)",
    "inference_table_entries": "Inferred sessions findable by their last prompt's block hash",
    "tier_enabled": "1 when the FP8 tier runs, 0 when it is off or cannot hold this engine's cache (see "
                    "kvsched_tier_disabled for the reason)",
    "tier_bytes": "Bytes the FP8 tier holds (quantized KV of sessions released under pressure), every rank's share "
                  "summed under tensor/pipeline parallelism",
    "tier_capacity_bytes": "The FP8 tier's byte budget, every rank's share summed (--kvsched-fp8-tier-gb on each "
                           "host, to a slot per rank; or the default rule, per rank)",
    "tier_rank_capacity_bytes": "The largest rank's share of the FP8 tier's budget: the most host memory one rank's "
                                "worker takes (tier_capacity_bytes / tier_ranks unless pipeline stages hold different "
                                "numbers of layers)",
    "tier_ranks": "The engine's ranks (tensor x pipeline parallel, every node), each holding its part of every "
                  "FP8-tier slot",
    "tier_blocks": "Slots the FP8 tier has in use: full KV blocks and the partial last blocks counted in tier_tails",
    "tier_tails": "Sessions whose partial last block (KV past their last full block) the FP8 tier holds",
    "disk_tier_bytes": "Bytes of KV blocks the disk level holds (--kvsched-disk-tier-dir)",
    "disk_tier_capacity_bytes": "The disk level's byte budget (--kvsched-disk-tier-gb, or half the free space; shrunk "
                                "to what it holds when the disk fills up; 0 once a prefix-cache reset turned it off)",
    "disk_tier_blocks": "KV blocks the disk level holds",
    "disk_tier_reading_blocks": "Disk-level blocks pinned while a restore reads them (never deleted meanwhile); a "
                                "read that hangs keeps its pin (kvsched_levels_fetch_stuck)",
    "levels_fetching_blocks": "FP8-tier slots a disk or shared-store fetch is filling in the background (the requests "
                              "that need them wait; every other request runs)",
    "store_up": "1 while the shared store (--kvsched-store-url) answers, 0 during an outage (requests recompute) or "
                "once a prefix-cache reset turned the shared level off",
    "tier_kv_rel_rms_error": "Relative RMS error of FP8-tiered KV against the original, sampled at demotion "
                             "(-1: nothing measured; 0 when the cache is already FP8 and stored as is)",
    "payback_fed": "1 once the pins' fallback to LRU is fed (vLLM's prefix cache has evicted a block), 0 before; only "
                   "while the fallback is on (KVSCHED_PAYBACK_SAMPLING: by default without the FP8 tier)",
    "payback_ttl_cap_seconds": "Longest TTL a new pin may get now, by the pins' balance against a ghost LRU pool "
                               "(0: no pins, the engine runs as stock LRU until the balance recovers)",
    "payback_balance_blocks": "The pins' prefix hits minus a ghost LRU pool's, sampled blocks, since it was fed "
                              "(< 0: pins have cost hits)",
}
COUNTERS = {
    "sessions_seen": "Distinct sessions seen",
    "requests_with_session": "Requests that named a session",
    "retained_hits": "Turns whose prefix-cache hit covered KV kvsched kept pinned for the session since its last turn",
    "retained_hit_tokens": "Prompt tokens of those hits on pinned KV (LRU may have kept some too: not prefill saved)",
    "rejected_requests": "Requests refused for malformed session input (HTTP 400)",
    "inferred_sessions": "Sessions inferred for requests without a session field (session inference)",
    "inferred_turns": "Turns served in inferred sessions (the first turn included)",
    "inference_hits": "Requests found (by block hash) to extend an inferred session's last turn, and joined to it",
    "inferred_shared_ends_ignored": "End hints ignored on inferred sessions that another conversation may share (a "
                                    "request repeated their last prompt): their TTL ends them",
    "inferred_shared_roles_ignored": "Role hints ignored on inferred sessions that another conversation may share: the "
                                     "session's role, once set, stays",
    "branches": "Turns under an existing session id that did not continue its prompt: a branch of their own",
    "branch_overflows": "Such turns past the branch limit of an id: served without a session",
    "branches_superseded": "Branches ended when kvsched's compaction rewrote their conversation into a new branch (their "
                           "KV freed at once, not at their TTL)",
    "side_turns_kept_pin": "Turns that ran beside another of their session and left its longer pin in place (e.g. a "
                           "title request sent with a conversation's turn)",
    "released_queued_blocks": "KV blocks released for pressure from sessions whose next request was already queued "
                              "(no idle pin was left: the pool is short of the burst's working set)",
    "tier_demotions": "Pin releases whose blocks were copied to the FP8 tier",
    "tier_demoted_blocks": "KV blocks copied (quantized) to the FP8 tier",
    "tier_evicted_blocks": "KV blocks the FP8 tier dropped for lack of room (lowest retention value first)",
    "tier_declined_evictions": "Of those, blocks the disk level had no room for, dropped because no other block could "
                               "go instead: lost from both (see kvsched_disk_tier_spills_declined)",
    "tier_restores": "Restores of full blocks from the FP8 tier instead of recomputes: requests admitted with tier "
                     "blocks plus prefetches",
    "tier_tail_restores": "Requests that got only their session's partial last block from the FP8 tier (at admission: "
                          "vLLM's prefix cache holds full blocks only, so a tail cannot be prefetched)",
    "tier_prefetched_restores": "Restores started ahead of scheduling (a prefetch: the session's request was queued, "
                                "or its next turn was due)",
    "tier_prefetches_queued": "Prefetches started when a session's request was queued",
    "tier_prefetches_due": "Prefetches started before a session's request arrived (its next turn was due)",
    "tier_prefetched_blocks": "KV blocks restored from the FP8 tier by prefetches",
    "tier_superseded_loads": "Planned restores dropped because their block was released and handed out again in the "
                             "same step (only the last load into a block runs)",
    "tier_worker_seconds": "Seconds the worker spent in the FP8 tier's copies (stores, restores, checksums) on the step's "
                           "critical path, before or during its forward pass",
    "tier_prefetch_useful_blocks": "Prefetched blocks the session's next turn hit",
    "tier_prefetch_wasted_blocks": "Prefetched blocks released or missed before a turn used them",
    "tier_wasted_prefetches": "Prefetches of which the session's next turn did not use every block",
    "tier_prefetch_hit_tokens": "Prompt tokens served from prefetched blocks",
    "tier_restored_blocks": "KV blocks restored (dequantized) from the FP8 tier",
    "tier_tails_stored": "Partial last blocks of finished turns copied to the FP8 tier (vLLM shares full blocks only)",
    "tier_restored_tail_tokens": "Prompt tokens restored from a session's partial last block in the FP8 tier",
    "tier_restore_misses": "Requests whose next prefix block had been in the FP8 tier but was evicted",
    "tier_load_failures": "Tier blocks that failed their checksum at restore (recomputed instead)",
    "disk_tier_written_blocks": "KV blocks written to the disk level (behind, by the worker's background thread)",
    "disk_tier_write_failures": "Disk-level writes that failed (e.g. a full disk); those blocks are recomputed if needed",
    "disk_tier_evicted_blocks": "Disk-level blocks deleted for room (unclaimed first, then lowest retention value)",
    "disk_tier_spills_declined": "FP8-tier blocks whose spill the disk level declined (no room: its other blocks "
                                 "being read, written or the session's own), each counted once a step however often "
                                 "offered: the FP8 tier keeps such a block while another can go, else offers it again "
                                 "and drops it (kvsched_tier_declined_evictions)",
    "disk_tier_indexed_blocks": "KV blocks found in the disk level's directory at start-up",
    "disk_tier_partial_blocks_removed": "KV blocks whose files only some tensor-parallel ranks wrote (an engine died "
                                        "between their writes), deleted at start-up once 10 minutes old",
    "disk_tier_restored_blocks": "KV blocks read back from the disk level into the FP8 tier (then into the pool)",
    "disk_tier_read_failures": "Disk-level blocks not served: torn, truncated, corrupted, another model's or missing "
                               "(recomputed)",
    "levels_fetch_waits": "Requests that waited for blocks being fetched from the disk or shared level (vLLM "
                          "scheduled the requests behind them meanwhile)",
    "levels_fetch_overdue": "Requests scheduled without blocks whose fetch missed its deadline (a stalled store or "
                            "disk): vLLM computed them; the fetch still serves the session's next turn",
    "levels_fetch_stuck": f"Disk or shared-store fetches some worker had still not reported {STUCK_AFTER_S:.0f} s past "
                          "their deadline (a hung read?): their sessions' blocks may be evicted again; their slots stay held until "
                          "reported",
    "levels_copy_failures": "Write jobs of the disk/shared levels whose host copy failed in the step (not written)",
    "levels_dropped_write_jobs": "Disk/shared-level write jobs dropped, the worker's write queue full (in jobs or "
                                 "bytes: a slow or hung disk or store); those blocks are recomputed if needed",
    "levels_write_jobs_dropped_for_bytes": "Of those, jobs dropped because the queued jobs held their byte bound",
    "levels_failed_write_jobs": "Disk/shared-level write jobs that raised on the worker's writer thread",
    "levels_shared_puts_dropped": "KV blocks whose shared-store put was dropped with its write job (published again "
                                  "next turn)",
    "levels_dropped_fetch_jobs": "Disk/shared-level fetch chunks dropped, the worker's fetch queue full or no fetch "
                                 "thread left to run them (kvsched_levels_fetch_thread_deaths): recomputed",
    "levels_failed_fetch_jobs": "Disk/shared-level fetch chunks that raised on the worker's fetch thread",
    "levels_fetches_given_up": "Disk/shared-level fetches a worker gave up unread, still queued (behind a hung or "
                               f"slow read) {STUCK_AFTER_S:.0f} s past their deadline, when the scheduler takes them "
                               "for stuck: recomputed, their files kept",
    "levels_fetch_thread_deaths": "Workers' fetch threads killed by an exception that is not an Exception (a "
                                  "library's SystemExit, CancelledError): what each held or had queued is reported "
                                  "unfilled, and a new thread starts, up to 3 times a worker; then its fetches are "
                                  "refused (kvsched_levels_dropped_fetch_jobs)",
    "shared_tier_restored_blocks": "KV blocks read from the shared store into the FP8 tier (then into the pool)",
    "shared_tier_read_failures": "Shared-store blocks not served: missing (expired, store down) or failing their "
                                 "checks (recomputed)",
    "store_outages": "Times the shared store became unreachable (each logged once)",
    "store_failed_calls": "Shared-store calls that failed (the request went on without the store)",
    "store_skipped_calls": "Shared-store calls skipped while waiting out the reconnect backoff",
    "store_error_replies": "Shared-store calls the store refused (an error reply such as OOM: that call failed, not an "
                           "outage)",
    "store_bad_values": "Malformed values read from the shared store (another version's or corrupt), treated as absent",
    "store_lookup_waits": "Requests that waited for the shared store to say which of their blocks it holds (asked off "
                          "the scheduler thread; vLLM scheduled the requests behind them meanwhile)",
    "store_lookup_overdue": "Requests scheduled without the shared store's answer, past its deadline (a slow or hung "
                            "store): they ran on what the other levels hold",
    "store_lookups_dropped": "Shared-store lookups at arrivals not made, the lookup queue full (those requests ran "
                             "without the store)",
    "shared_tier_put_failures": "KV blocks the shared store did not take (failed or dropped writes; published again "
                                "next turn)",
    "moved_sessions": "Sessions whose first request here had last been served by another replica (per the store)",
    "moved_sessions_restored": "Moved sessions whose KV was restored from the shared store",
    "payback_probes": "Times pins were tried again after the pins' fallback to LRU had cut them off (100 requests "
                      "each; the pause before the next doubles while they keep losing)",
    "payback_clamped_pins": "Times a held pin's TTL was shortened because the fallback's TTL cap fell (to half of "
                            "its last bound, or to 0)",
}
TIER_ONLY = frozenset(k for k in (*GAUGES, *COUNTERS) if k.startswith("tier_"))
LEVEL_PREFIXES = ("disk_tier_", "shared_tier_", "store_", "moved_", "payback_", "levels_")  # only when configured (on)
API_SIDE = frozenset({"rejected_requests"})  # counted by the API server, rendered whether the engine answers or not
RELEASE_REASONS = tuple(r.value for r in ReleaseReason)  # every reason (found by review: payback was never exported)


class _StatsCollector:
    def __init__(self, stats: Mapping[str, Any]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        tier = "tier_capacity_bytes" in self.stats  # tier series only when the server runs the FP8 tier
        for name, doc in GAUGES.items():
            if name.startswith(LEVEL_PREFIXES) and name not in self.stats:
                continue
            if tier or name not in TIER_ONLY:
                yield GaugeMetricFamily(f"kvsched_{name}", doc, value=float(self.stats.get(name, 0)))
        for name, doc in COUNTERS.items():
            if name in API_SIDE:
                continue
            if (not tier and name in TIER_ONLY) or (name.startswith(LEVEL_PREFIXES) and name not in self.stats):
                continue
            yield CounterMetricFamily(f"kvsched_{name}", doc, value=float(self.stats.get(name, 0)))
        if reason := self.stats.get("tier_disabled_reason"):
            disabled = GaugeMetricFamily("kvsched_tier_disabled", "Why the FP8 tier cannot hold this engine's cache",
                                         labels=["reason"])
            disabled.add_metric([str(reason)[:200]], 1.0)
            yield disabled
        released = CounterMetricFamily("kvsched_pin_releases", "Session pins released whole, by reason",
                                       labels=["reason"])
        partial = CounterMetricFamily("kvsched_pin_partial_releases", "Session pins shortened (tail blocks released), "
                                      "by reason", labels=["reason"])
        blocks = CounterMetricFamily("kvsched_pin_released_blocks", "KV blocks released from session pins, by reason "
                                     "(per pin: a block several sessions' pins share counts once per pin; "
                                     "kvsched_pinned_blocks counts each block once)",
                                     labels=["reason"])
        for reason in RELEASE_REASONS:
            released.add_metric([reason], float(self.stats.get(f"released_{reason}", 0)))
            partial.add_metric([reason], float(self.stats.get(f"released_{reason}_partial", 0)))
            blocks.add_metric([reason], float(self.stats.get(f"released_blocks_{reason}", 0)))
        yield released
        yield partial
        yield blocks


class _UpCollector:
    """`kvsched_stats_up`: 1 when the engine core answered this scrape, else 0 (and no engine series at all: a
    counter reported as 0 would read as a reset)."""

    def __init__(self, up: bool, api_side: Mapping[str, Any]) -> None:
        self.up, self.api_side = up, api_side

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("kvsched_stats_up", "1 if the engine core's scheduler answered this scrape in time",
                                value=1.0 if self.up else 0.0)
        for name, value in self.api_side.items():
            yield CounterMetricFamily(f"kvsched_{name}", COUNTERS[name], value=float(value))


class _Only:
    """A registry's series named in `names` (sample names, as prometheus_client's `restricted_registry` matches them;
    that one skips collectors that do not describe themselves, as these do not)."""

    def __init__(self, registry: CollectorRegistry, names: frozenset[str]) -> None:
        self.registry, self.names = registry, names

    def collect(self) -> Iterator[Metric]:
        for metric in self.registry.collect():
            samples = [s for s in metric.samples if s.name in self.names]
            if samples:
                narrowed = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                narrowed.samples = samples
                yield narrowed


def render_metrics(stats: Mapping[str, Any] | None, openmetrics: bool = False,
                   api_side: Mapping[str, Any] | None = None, names: Collection[str] | None = None) -> bytes:
    """The `kvsched_*` lines: `stats` from the scheduler (None: it did not answer), `api_side` counters kept by the
    API server itself (rendered either way). `names`: only these series (a scrape's `name[]`)."""
    source = api_side if api_side is not None else (stats or {})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_UpCollector(stats is not None,  # type: ignore[arg-type]
                                   {name: source.get(name, 0) for name in sorted(API_SIDE)}))
    if stats is not None:
        registry.register(_StatsCollector(stats))  # type: ignore[arg-type]
    return exposition(registry, openmetrics, names)


def exposition(registry: CollectorRegistry, openmetrics: bool, names: Collection[str] | None = None) -> bytes:
    """`registry` in the scrape's format, without OpenMetrics' `# EOF` (the splice keeps vLLM's), narrowed to the
    series `names` as prometheus_client narrows vLLM's own for `/metrics?name[]=...` (found by review: kvsched's
    were appended whole)."""
    source: Any = registry if names is None else _Only(registry, frozenset(names))
    if openmetrics:
        text = generate_latest_openmetrics(source)
        return text[: -len(b"# EOF\n")] if text.endswith(b"# EOF\n") else text
    return generate_latest(source)
