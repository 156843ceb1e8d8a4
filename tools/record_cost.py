"""What recording (`KVSCHED_RECORD_TRACE`) costs the engine thread per finished request, without an engine.

    python tools/record_cost.py [SESSIONS] [TURNS] [NEW_BLOCKS]      (default 200 sessions x 20 turns, 30 new blocks)

Each turn extends its session's chained history (SHA-256 block hashes, as vLLM's) by NEW_BLOCKS blocks and ends in a
partial block of 10 tokens that the next turn's prompt repeats; the timer covers `TraceRecording.arrived` + `finished`
(keyed hashes of the new blocks, the tail compared and kept, the line's JSON, writing it to memory).
A profile of the pure recording cost, not a benchmark of an engine; used for docs/trace_schema.md's figure.
"""

from __future__ import annotations

import hashlib
import io
import sys
import time

from kvsched.sim.trace_record import Finished, TraceRecording


def main() -> int:
    given = [int(a) for a in sys.argv[1:4]]
    sessions, turns, new = given + [200, 20, 30][len(given):]
    rec = TraceRecording(io.StringIO(), 16)
    history: dict[int, list[bytes]] = {s: [] for s in range(sessions)}
    spent, n = 0.0, 0
    for turn in range(turns):
        for s in range(sessions):
            h = history[s]
            prev = h[-1] if h else b""
            for _ in range(new):
                prev = hashlib.sha256(prev + b"tokens").digest()
                h.append(prev)
            blocks = list(h)
            prompt = len(blocks) * 16 + 3  # + 8 output tokens: KV for 10 tokens past the full blocks
            tokens = list(range(prompt + 8))  # a session's tokens are the same sequence turn after turn
            t0 = time.perf_counter()
            rec.arrived(f"{s}-{turn}", turn * 10.0 + s * 0.01, ("session", s), None)
            rec.finished(f"{s}-{turn}", turn * 10.0 + s * 0.01 + 1.0, Finished(prompt, 8, blocks, tokens=tokens))
            spent += time.perf_counter() - t0
            n += 1
    print(f"{n} requests of up to {turns * new} blocks ({new} new each): {spent / n * 1e6:.1f} us per request, "
          f"{len(rec.stream.getvalue()) / n:.0f} bytes of trace per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
