"""`kvsched bench sched`: the per-pair summary, the options, and what a step's time covers (a few steps of vLLM's real
scheduler)."""

import time

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
    assert not args.tier and build_parser().parse_args(["bench", "sched", "--tier"]).tier


def test_a_steps_time_covers_the_add_request_of_the_turns_it_finished(harness_cfg):
    """Found by review: kvsched's add_request hook (the request's session, lineage, the policy) was left out of the
    timed step; stock's add_request is cheap, so the ratio read low."""
    pytest.importorskip("vllm")
    from kvsched.adapters.vllm.harness import STOCK_SCHEDULER
    from kvsched.bench.sched import _Round

    rnd = _Round(STOCK_SCHEDULER, harness_cfg.model_dir, 0)
    add = rnd.s.add_request

    def slow_add(request):
        time.sleep(0.002)
        add(request)

    rnd.s.add_request = slow_add
    spent, finished = 0.0, 0
    while finished == 0:
        spent = rnd.step()
        finished = rnd.work["finished_turns"]
    assert spent >= 0.002 * finished
    rnd.close()


def test_the_tier_option_gives_the_kvsched_side_its_fp8_tier_and_the_same_load(harness_cfg):
    pytest.importorskip("vllm")
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER, STOCK_SCHEDULER
    from kvsched.bench.sched import _Round, _same_load

    sides = [_Round(STOCK_SCHEDULER, harness_cfg.model_dir, 0, tier=True),
             _Round(KVSCHED_SCHEDULER, harness_cfg.model_dir, 0, tier=True)]
    assert getattr(sides[0].s, "connector", None) is None and sides[1].s.connector.enabled
    for _ in range(40):
        for r in sides:
            r.step()
    stock, kvsched = (r.close() for r in sides)
    assert _same_load(stock, kvsched, tier=True) and not _same_load(stock, kvsched, tier=False)
    assert kvsched["scheduled_tokens"] < stock["scheduled_tokens"]  # the tier's restored tails
    assert not _same_load(stock, kvsched | {"finished_turns": kvsched["finished_turns"] - 1}, tier=True)
