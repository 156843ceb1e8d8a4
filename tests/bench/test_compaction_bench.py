"""`kvsched bench compaction`'s bookkeeping without servers: every side polled alike, the answers' rate beside the
served-token rate, and the sample counts of its percentiles."""

from __future__ import annotations

from kvsched.bench import compaction
from kvsched.bench.agents_driver import RunRecord, TurnRecord


def record(errors: int = 0) -> RunRecord:
    turns = [TurnRecord(f"s{i % 4}", i // 4, 0.1, 0.2, 300 + 10 * i, 8) for i in range(12)]
    turns += [TurnRecord("s0", 9, None, 0.1, 0, 0, error="APIError: x") for _ in range(errors)]
    return RunRecord(turns, wall_s=4.0)


def test_every_side_is_polled_stock_too(monkeypatch):
    """Found by review: only the kvsched sides were polled (5 requests a second on their servers), stock was not."""
    polled = []

    class Server:
        base, url = "http://h:1", "http://h:1/v1"

        def __init__(self, spec):
            self.spec = spec

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def metrics(self):
            return {}

    class Sampler:
        def __init__(self, base):
            polled.append(base)
            self.peaks = {"s0": 123}

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(compaction, "VllmServer", Server)
    monkeypatch.setattr(compaction, "PinSampler", Sampler)
    monkeypatch.setattr(compaction, "prefill_throughput", lambda *a: 1000.0)
    monkeypatch.setattr(compaction, "run_with_progress", lambda *a, **k: record())
    cfg = compaction.workload(4, 3, 20, 0)
    stock = compaction.run_side("stock", type("Spec", (), {"scheduler": None, "served_model_name": "c",
                                                            "max_model_len": 2048})(), cfg, 4096, False)
    kv = compaction.run_side("summarize", type("Spec", (), {"scheduler": "kvsched", "served_model_name": "c",
                                                            "max_model_len": 2048})(), cfg, 4096, False)
    assert polled == ["http://h:1", "http://h:1"]
    assert "peak_pinned_tokens_per_session" not in stock and kv["peak_pinned_tokens_per_session"] > 0


def test_the_answers_rate_and_the_percentiles_sample_counts_are_reported():
    """Found by review: throughput_tok_s counts served prompt tokens, which compaction shrinks by design; a p95 over 4
    sessions did not say so."""
    out = compaction.side_result(record(), {}, {}, 4096, None)
    assert out["completion_tok_s"] == 12 * 8 / 4.0
    assert out["sessions_measured"] == 4 and out["followup_ttft_n"] == 8
    assert "invalid" not in out
    assert compaction.side_result(record(errors=2), {}, {}, 4096, None)["invalid"] == "2 of 14 turns failed"
