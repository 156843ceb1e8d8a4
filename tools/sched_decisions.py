"""Do two kvsched source trees decide the same on `kvsched bench sched`'s load? Every applied decision, in order.

    python tools/sched_decisions.py TREE_A TREE_B [SESSIONS] [STEPS]     (default 256 sessions, 300 steps)

Trees as for tools/sched_ab.py (a directory holding a `kvsched` package with the built `_C*.so`). Each tree runs one
round of the bench's load (seed 1; the 10,000 tier's untimed first turns included) in a process of its own, with its
decision trace on (KVSCHED_TRACE: each turn's start, pin and release) and the policy's clock moved by the step (25 ms a
step) instead of read from the machine, so that a round is deterministic and two trees' traces compare row by row.
sched_ab.py's check (the same tokens, turns and hits per pair) is coarser: a cut meant to remove work, not change a
decision, should leave this trace byte for byte the same. Session names in the trace are keyed digests that differ
per process: they are compared by order of first appearance. Exit status 1 if the traces or the final stats differ.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

STEP_S = 0.025


def _round(tree: str, sessions: int, steps: int, trace: str) -> dict[str, Any]:
    """One round from `tree` (run in a spawned process): its normalised decision rows, work and stats."""
    sys.path.insert(0, tree)
    os.environ["KVSCHED_TRACE"] = trace
    import kvsched

    if not kvsched.__file__ or not kvsched.__file__.startswith(tree):
        raise SystemExit(f"{tree}: imported kvsched from {kvsched.__file__}")
    from kvsched.adapters.vllm import scheduler, session_pins
    from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER
    from kvsched.bench import sched
    from kvsched.tiny_model import ensure_tiny_model

    now = [1000.0]
    pins_cls = session_pins.SessionPins

    def stepped_pins(*args: Any, **kwargs: Any) -> Any:
        return pins_cls(*args, **{**kwargs, "clock": lambda: now[0]})  # the policy's clock: the step's time

    # The name the scheduler builds its pins by, not the class's __init__: a compiled (mypyc) class ignores a
    # replaced __init__ (found when session_pins was compiled: its trace ran on the machine's clock).
    scheduler.SessionPins = stepped_pins  # type: ignore[assignment,misc]
    step = sched._Round.step

    def timed_step(self: Any) -> float:
        now[0] += STEP_S
        return step(self)

    sched._Round.step = timed_step  # type: ignore[method-assign]
    rnd = sched._Round(KVSCHED_SCHEDULER, ensure_tiny_model("test"), 1, sessions, True)
    for _ in range(steps):
        rnd.step()
    stats = rnd.s.kvsched.stats()
    work = rnd.close()
    names: dict[str, int] = {}
    rows = []
    for line in Path(trace).read_text().splitlines():
        row = json.loads(line)
        row["session"] = names.setdefault(row["session"], len(names))
        rows.append(row)
    return {"rows": rows, "work": work, "stats": stats}


def _child(conn: Any, *args: Any) -> None:
    conn.send(_round(*args))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    trees = [os.path.abspath(t) for t in args[:2]]
    sessions = int(args[2]) if len(args) > 2 else 256
    steps = int(args[3]) if len(args) > 3 else 300
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    ctx = mp.get_context("spawn")  # vLLM and torch are not fork-safe once imported
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, tree in enumerate(trees):  # one after the other: each its own process and heap
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child, args=(child, tree, sessions, steps, f"{tmp}/trace{i}.jsonl"))
            proc.start()
            child.close()
            out.append(parent.recv())
            proc.join()
    a, b = out
    ops: dict[str, int] = {}
    for row in a["rows"]:
        ops[row["op"]] = ops.get(row["op"], 0) + 1
    first = next((i for i, (x, y) in enumerate(zip(a["rows"], b["rows"], strict=False)) if x != y), None)
    same_rows = first is None and len(a["rows"]) == len(b["rows"])
    same = same_rows and a["work"] == b["work"] and a["stats"] == b["stats"]
    print(f"{sessions} sessions, {steps} steps: {len(a['rows'])} / {len(b['rows'])} decisions (A: {ops}); "
          f"same decisions: {same_rows}; same work and stats: {a['work'] == b['work'] and a['stats'] == b['stats']}")
    if first is not None:
        print(f"first difference at row {first}:\n  A {a['rows'][first]}\n  B {b['rows'][first]}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
