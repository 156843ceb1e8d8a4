"""The compaction middleware's Prometheus metrics (`kvsched_compaction_*`), from `Compactor.stats()`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from kvsched.core.compaction_config import Strategy

FAILURE_REASONS = ("timeout", "error", "empty")
GAUGES = {
    "sessions": "Sessions with compaction state on this API server",
    "summaries_in_flight": "Summarization calls under way",
    "trigger_tokens": "Older-context tokens that trigger a compaction",
}
COUNTERS = {
    "summary_calls": "Summarization calls made (one per trigger)",
    "summaries": "Summaries stored",
    "summaries_dropped": "Summaries discarded: their conversation ended (or its state was evicted) while the call ran",
    "summary_seconds": "Time spent in summarization calls",
    "windows": "Sliding-window cuts made",
    "summary_inputs_cut": "Summary calls that left a session's oldest turns out to fit the model's context",
    "summaries_no_room": "Summaries not made: the system prompt, the instruction and the summary's target size "
                         "left no room for a turn in the model's context",
    "summaries_held_back": "Summary calls not made: the conversation's newest summary was never used by a later "
                           "request (its client changes old messages), so it backs off "
                           "(KVSCHED_COMPACTION_RETRY_AFTER_S, doubled for each unused summary in a row)",
    "context_triggers": "Compactions made because a session's prompt reached 3/4 of the model's context before "
                        "its older turns reached KVSCHED_COMPACTION_TRIGGER_TOKENS",
    "summaries_truncated": "Summaries that reached KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS before their end "
                           "(finish_reason length): kept, cut short",
    "rewrites_refused": "Compacted requests vLLM refused (HTTP 400/422 not about length or a parameter, e.g. a chat "
                        "template that rejects the rewrite): their conversation is served as sent from then on",
    "rewrites_resent": "Compacted requests vLLM refused for what the rewrite may have caused (HTTP 400/422 not about "
                       "length or a parameter), sent again as the client sent it: the client got that answer",
    "refused_requests": "Requests refused past the context cap (HTTP 400)",
    "opt_outs": "Requests that opted out of compaction (X-KVSched-Compaction: off)",
    "oversized_requests": "Requests with a message far past the model's context: not tokenized (cap: HTTP 400)",
    "refused_choices": "Requests refused (HTTP 403) for a strategy the operator did not enable for clients",
    "replaced_messages": "Client messages replaced by a summary or dropped, over all rewritten requests",
    "saved_tokens": "Prompt tokens removed by compaction (estimated with the served tokenizer)",
    "shared_checkpoints_loaded": "Summaries taken from the shared store for sessions new to this server (moved)",
    "shared_checkpoints_saved": "Times a session's summaries were written to the shared store",
    "shared_checkpoints_bad": "Malformed summaries in the shared store, dropped (the session went on from local state)",
    "shared_checkpoint_errors": "Shared-store loads of summaries that failed (the request was served from local state)",
    "shared_store_bad_values": "Values in the shared store that were not even text (UTF-8), treated as absent",
}


class Collector:
    def __init__(self, stats: Mapping[str, float]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"kvsched_compaction_{name}", doc, value=self.stats.get(name, 0.0))
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"kvsched_compaction_{name}", doc, value=self.stats.get(name, 0.0))
        rewritten = CounterMetricFamily("kvsched_compaction_rewritten_requests", "Requests rewritten by compaction, "
                                        "by strategy (one vLLM refused and that was sent again as sent counts here "
                                        "and in kvsched_compaction_rewrites_resent)", labels=["strategy"])
        for st in (Strategy.SUMMARIZE, Strategy.SLIDING_WINDOW):
            rewritten.add_metric([st.value], self.stats.get(f"rewritten_{st.value}", 0.0))
        yield rewritten
        failures = CounterMetricFamily("kvsched_compaction_summary_failures", "Summarization calls that failed "
                                       "(the request was served uncompacted), by reason", labels=["reason"])
        for reason in FAILURE_REASONS:
            failures.add_metric([reason], self.stats.get(f"failed_{reason}", 0.0))
        yield failures
