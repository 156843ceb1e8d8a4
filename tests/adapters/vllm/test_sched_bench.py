"""`kvsched bench sched`: the per-pair summary and the options (no scheduler runs here)."""

import pytest

from kvsched.bench.sched import summarize
from kvsched.cli import build_parser


def test_headline_is_the_ratio_of_mean_step_times_and_pairs_are_reported_beside_it():
    pairs = [{"stock": [1.0, 3.0], "kvsched": [2.0, 2.0]},  # pair ratio 1.0
             {"stock": [1.0, 1.0], "kvsched": [1.5, 1.5]},  # 1.5
             {"stock": [2.0, 2.0], "kvsched": [2.2, 2.2]}]  # 1.1
    out = summarize(pairs)
    assert out["stock"]["steps"] == out["kvsched"]["steps"] == 6
    assert out["stock"]["step_us"] == pytest.approx(10 / 6 * 1e6)
    assert out["kvsched"]["step_us"] == pytest.approx(11.4 / 6 * 1e6)
    assert out["ratio"] == pytest.approx(11.4 / 10)
    assert out["pair_ratios"] == pytest.approx([1.0, 1.5, 1.1])
    assert out["pair_ratio_median"] == pytest.approx(1.1)
    assert out["pair_ratio_range"] == pytest.approx([1.0, 1.5])
    assert out["kvsched"]["round_step_us"] == pytest.approx([2e6, 1.5e6, 2.2e6])


def test_options():
    args = build_parser().parse_args(["bench", "sched", "--quick", "--rounds", "3", "--steps", "10"])
    assert args.quick and args.rounds == 3 and args.steps == 10
    assert args.cpu is None and not args.aa  # pinned to the highest usable CPU by default; kvsched on the other side
    args = build_parser().parse_args(["bench", "sched", "--cpu", "-1", "--aa"])
    assert args.cpu == -1 and args.aa
