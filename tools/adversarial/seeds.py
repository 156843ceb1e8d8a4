"""Is a case above LRU a property of the shape or of one seed? Generates a shape for several seeds, replays each
under LRU and kvsched (timeline.py's configuration: `kvsched simulate --pressure-basis live`) and, for every request
whose prefill differs, names what happened to its session's pin between its previous turn's end and its arrival:
`pressure` (released, wholly or in part, for a live request's shortage: the release order chose it), `ttl` (released
at its TTL only: its blocks entered the free queue then, later than under LRU), `pinned` (still held) or `unpinned`.

usage: [VARIANT=NAME] python tools/adversarial/seeds.py SHAPE FIRST_SEED END_SEED PRESSURES [OUT.json]
(PYTHONPATH=the worktree)
(Adversarial review, stop 53: h_mooncake_like 3x, the grid's last case above LRU.)"""
from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timeline as tl  # noqa: E402
import variants  # noqa: E402,F401  (VARIANT: a scratch variant of the core, see variants.py; none by default)

from kvsched.core import retention as R  # noqa: E402
from kvsched.core.config import RetentionConfig  # noqa: E402
from kvsched.sim import replay as rp  # noqa: E402
from kvsched.sim.trace import Trace  # noqa: E402

EVENTS: dict[Any, list[tuple[float, str]]] = collections.defaultdict(list)  # session id -> [(time, event)]


def _hook() -> None:
    """Record every pin and release of the kvsched side (the policy's own decisions, unchanged)."""
    release, finished = R.RetentionPolicy._release, R.RetentionPolicy.turn_finished

    def _release(self, rec, reason, blocks=None):  # type: ignore[no-untyped-def]
        EVENTS[rec.key.session_id].append((self.clock(), reason.value))
        return release(self, rec, reason, blocks)

    def turn_finished(self, key, hints, tokens, blocks, whole_only=False):  # type: ignore[no-untyped-def]
        out = finished(self, key, hints, tokens, blocks, whole_only)
        EVENTS[key.session_id].append((self.clock(), "pin" if any(isinstance(d, R.Pin) for d in out) else "turn"))
        return out

    R.RetentionPolicy._release = _release  # type: ignore[method-assign]
    R.RetentionPolicy.turn_finished = turn_finished  # type: ignore[method-assign]


def kind(events: list[tuple[float, str]], t: float) -> str:
    """What happened to the session's pin from its last turn's end before `t` to `t`."""
    seen = [e for _, e in events if _ <= t]
    last = max((i for i, e in enumerate(seen) if e in ("pin", "turn")), default=None)
    if last is None or seen[last] == "turn":
        return "unpinned"
    after = seen[last + 1:]
    return "pressure" if "pressure" in after else "ttl" if "ttl" in after else "pinned" if not after else after[-1]


def one(path: str, pressure: float) -> dict[str, Any]:
    trace = Trace.load(path)
    cap = max(math.ceil(trace.peak_live_blocks() / pressure), 1)
    cfg = rp.ReplayConfig(capacity_blocks=cap, bytes_per_token=65536.0, retention=RetentionConfig.from_env())
    lru, _ = tl.run(trace, "lru", cfg)
    EVENTS.clear()
    kv, _ = tl.run(trace, "kvsched", cfg)
    d = kv - lru
    by: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for i in np.flatnonzero(d):
        k = kind(EVENTS[trace.sessions[int(trace.session[i])][0]], float(trace.t[i]))
        by[k][0] += 1
        by[k][1] += int(d[i])
    return {"pool_blocks": cap, "lru": int(lru.sum()), "kvsched": int(kv.sum()), "diff": int(d.sum()),
            "ratio": float(kv.sum() / lru.sum()), "requests_differing": int(np.count_nonzero(d)),
            "by_pin_event": {k: {"requests": v[0], "tokens": v[1]} for k, v in sorted(by.items())}}


def main() -> None:
    shape, first, end, pressures = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
    out = sys.argv[5] if len(sys.argv) > 5 else None
    _hook()
    rows = []
    gen = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen.py")
    for seed in range(first, end):
        path = f"/tmp/kv/seeds/{shape}_s{seed}.jsonl"
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            subprocess.run([sys.executable, gen, shape, path, str(seed)], check=True, capture_output=True)
        for p in pressures:
            row = {"shape": shape, "seed": seed, "pressure": float(p), **one(path, float(p))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for p in sorted({r["pressure"] for r in rows}):
        diffs = np.array([r["diff"] for r in rows if r["pressure"] == p], dtype=np.float64)
        ev: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for r in rows:
            if r["pressure"] == p:
                for k, v in r["by_pin_event"].items():
                    ev[k][0] += v["requests"]
                    ev[k][1] += v["tokens"]
        print(f"pressure {p}: {len(diffs)} seeds, kvsched - LRU mean {diffs.mean():+.0f} tokens "
              f"(sd {diffs.std():.0f}), "
              f"above {int((diffs > 0).sum())}, below {int((diffs < 0).sum())}, equal {int((diffs == 0).sum())}, "
              f"worst {max(r['ratio'] for r in rows if r['pressure'] == p):.5f}; by pin event: "
              + ", ".join(f"{k} {n} requests {t:+d}" for k, (n, t) in sorted(ev.items())))
    if out:
        with open(out, "w") as f:
            json.dump({"command": " ".join(["python", *sys.argv]), "variant": variants.V or None, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
