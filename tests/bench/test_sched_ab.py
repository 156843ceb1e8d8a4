"""tools/sched_ab.py's A/B of two source trees: the safeguards of `kvsched bench sched` (untimed warm-up pair on every
process, the processes alternating between pairs, the same work enforced) and its JSON, on fake workers (no vLLM)."""

from __future__ import annotations

import json

from tests.tools_loader import load_tool as _load


def load_tool():
    return _load("sched_ab")


class FakeWorker:
    """Answers kvsched.bench.sched's worker protocol: a fixed step time, and `work` at the end of a round."""

    def __init__(self, name: str, step_s: float, work: dict) -> None:
        self.name, self.step_s, self.work = name, step_s, work
        self.rounds: list[int] = []  # seeds of the rounds it ran
        self.steps = 0
        self._reply = None

    def send(self, msg) -> None:
        cmd, arg = msg
        if cmd == "round":
            self.rounds.append(arg[1])
        elif cmd == "step":
            self.steps += 1
        self._reply = {"round": None, "step": self.step_s, "end": dict(self.work, pinned_sessions_at_end=7)}.get(cmd)

    def recv(self):
        return self._reply


def workers(b_work: dict | None = None) -> dict:
    work = {"scheduled_tokens": 100, "finished_turns": 5, "cached_prompt_tokens": 40}
    return {(t, p): FakeWorker(f"{t}{p}", 1e-3 if t == "A" else 1.1e-3, work if t == "A" else (b_work or work))
            for t in "AB" for p in (0, 1)}


def test_a_warm_up_pair_first_then_pairs_alternating_between_the_processes():
    """Found by review: no warm-up pair, tree A always in process 0."""
    conns = workers()
    result = load_tool().run_ab(conns, pairs=4, steps=10, sessions=256, tier=False)
    for (tree, proc), w in conns.items():
        assert w.rounds == [99, proc, proc + 2], (tree, proc, w.rounds)  # warm-up seed 99, then its pairs
    assert result["same_work"] and [r["processes"] for r in result["pairs"]] == [0, 1, 0, 1]
    assert abs(result["b_over_a"] - 1.1) < 1e-9


def test_different_work_is_a_failure_and_the_json_has_provenance(tmp_path, monkeypatch):
    """Found by review: the same work was printed, not enforced, and nothing was written."""
    tool = load_tool()
    conns = workers(b_work={"scheduled_tokens": 100, "finished_turns": 5, "cached_prompt_tokens": 41})
    for tree in ("a", "b"):
        (tmp_path / tree / "kvsched").mkdir(parents=True)
        (tmp_path / tree / "kvsched" / "__init__.py").write_text(f"# {tree}\n")

    class Ctx:  # the spawned processes: the fake workers, in the order main starts them
        def __init__(self):
            self.order = iter([("A", 0), ("B", 0), ("B", 1), ("A", 1)])

        def Pipe(self):  # noqa: N802 - multiprocessing's name
            return conns[next(self.order)], type("End", (), {"close": lambda self: None})()

        def Process(self, **kw):  # noqa: N802
            return type("P", (), {"start": lambda self: None})()

    monkeypatch.setattr(tool.mp, "get_context", lambda how: Ctx())
    out = tmp_path / "ab.json"
    code = tool.main([str(tmp_path / "a"), str(tmp_path / "b"), "2", "5", "--sessions", "256", "--out", str(out)])
    data = json.loads(out.read_text())
    assert code == 1 and data["same_work"] is False and data["pairs"][0]["same_work"] is False
    prov = data["config"]["provenance"]
    assert prov["command"].startswith("python tools/sched_ab.py") and "git_commit" in prov
    digests = {k: v["digest"] for k, v in data["config"]["trees"].items()}
    assert len(digests["A"]) == 12 and digests["A"] != digests["B"]
