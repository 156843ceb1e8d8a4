"""The benchmarks' bar charts: a ratio that does not exist (a side that does not compare) is not drawn as 0."""

from __future__ import annotations

import math

import pytest

from kvsched.bench import plots


@pytest.fixture
def drawn(monkeypatch):
    """The figure grouped_bars draws, kept open instead of saved."""
    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig) or path)
    yield figs
    for fig in figs:
        plots.pyplot().close(fig)


def bars_and_words(fig):
    ax = fig.axes[0]
    return [p.get_height() for p in ax.patches], [t.get_text() for t in ax.texts]


def test_a_none_ratio_draws_no_bar_and_says_invalid(drawn, tmp_path):
    """Found by review: `float(g.get(name) or 0.0)` drew an invalid side (over_stock None) as a bar of 0."""
    plots.grouped_bars({"measured (over stock)": {"stock": 1.0, "kvsched": None}}, tmp_path / "x.png", "t", "ratio")
    heights, words = bars_and_words(drawn[0])
    assert heights[0] == 1.0 and math.isnan(heights[1])
    assert words == ["invalid"]


def test_side_ratios_give_none_for_a_side_or_base_marked_invalid():
    result = {"stock": {"prefill": 100.0}, "a": {"prefill": 50.0}, "b": {"prefill": 10.0, "invalid": "2 failed"}}
    assert plots.side_ratios(result, ["a", "b"], ["prefill"]) == {"prefill": {"a": 0.5, "b": None}}
    result["stock"]["invalid"] = "1 failed"
    assert plots.side_ratios(result, ["a"], ["prefill"]) == {"prefill": {"a": None}}


def test_the_replay_chart_keeps_an_invalid_sides_ratio_out(drawn, tmp_path, monkeypatch):
    """trace_engine.run's chart: it drew `r["over_stock"] or 0.0`."""
    from kvsched.bench import trace_engine

    sides = trace_engine._with_ratios({"stock": {"prefill_tokens_computed": 1000},
                                       "kvsched": {"prefill_tokens_computed": 10, "invalid": "37 of 1750 failed"}})
    result = {"sides": {s: r | {"ttft_p50_s": None, "ttft_p95_s": None, "errors": 0, "mean_send_lateness_s": 0.0}
                        for s, r in sides.items()},
              "simulator": {"lru": {"over_lru": 1.0, "rejected": 0}}, "config": {"trace": "t.jsonl"}}
    monkeypatch.setattr(trace_engine, "prepare", lambda args: None)
    monkeypatch.setattr(trace_engine, "run_benchmark", lambda setup, checkpoint: result)
    monkeypatch.setattr(trace_engine, "save_beside", lambda out, draw: draw(tmp_path / "r.png"))
    assert trace_engine.run(type("Args", (), {"out": tmp_path / "r.json"})()) == 1  # an invalid side: exit 1
    heights, words = bars_and_words(drawn[0])  # bars by side, then by group: stock's, kvsched's, LRU's
    assert heights[0] == 1.0 and math.isnan(heights[2]) and words == ["invalid"]  # kvsched's measured ratio
    assert math.isnan(heights[1]) and heights[5] == 1.0  # no stock bar in the simulator's group
