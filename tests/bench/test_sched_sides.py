"""tools/sched_sides.py's lockstep of several sides: each side in each process equally often, every side's work held
to stock's, each side's knob given to its round (fake workers, no vLLM)."""

from __future__ import annotations

from tests.tools_loader import load_tool as _load


def load_tool():
    return _load("sched_sides")


WORK = {"scheduled_tokens": 100, "finished_turns": 5, "cached_prompt_tokens": 40}


class FakeWorker:
    """Answers the tool's worker protocol: a step time per scheduler class, `work` at the end of a round."""

    def __init__(self, step_s: dict[str, float], work: dict[str, dict]) -> None:
        self.step_s, self.work = step_s, work
        self.rounds: list[tuple] = []  # (class, env, seed) of each round it ran
        self._reply = None

    def send(self, msg) -> None:
        cmd, arg = msg
        if cmd == "round":
            self.rounds.append(arg[:3])
        cls = self.rounds[-1][0] if self.rounds else None
        env = self.rounds[-1][1] if self.rounds else {}
        key = cls + str(sorted(env.items())) if cls else None
        self._reply = {"round": None, "step": self.step_s.get(key, 1e-3),
                       "end": dict(self.work.get(key, WORK), pinned_sessions_at_end=0, turn_releases=0, stats={})
                       }.get(cmd)

    def recv(self):
        return self._reply


def test_each_side_runs_in_each_process_and_gets_its_knob():
    tool = load_tool()
    sides = ["stock", "floor", "kvsched-payback0"]
    procs = [FakeWorker({tool.FLOOR + "[]": 1.2e-3}, {}) for _ in sides]
    result = tool.run_tier(tool.placements(sides, procs), rounds=3, steps=4, sessions=256)
    for w in procs:  # every process ran every side once, seeds 0, 1, 2
        assert sorted((cls, tuple(env.items())) for cls, env, _ in w.rounds) == sorted(
            (tool.KNOBS[s][0], tuple(tool.KNOBS[s][1].items())) for s in sides)
        assert sorted(seed for *_, seed in w.rounds) == [0, 1, 2]
    assert {"KVSCHED_PAYBACK_SAMPLING": "0"} in [env for w in procs for _, env, _ in w.rounds]
    assert abs(result["floor"]["ratio"] - 1.2) < 1e-9 and result["kvsched-payback0"]["ratio"] == 1.0
    assert all(s["same_load"] for s in result.values())


def test_a_side_that_does_other_work_than_stock_is_flagged():
    tool = load_tool()
    other = dict(WORK, cached_prompt_tokens=41)
    procs = [FakeWorker({}, {tool.FLOOR + "[]": other}) for _ in range(2)]
    result = tool.run_tier(tool.placements(["stock", "floor"], procs), rounds=2, steps=2, sessions=256)
    assert result["stock"]["same_load"] and not result["floor"]["same_load"]
