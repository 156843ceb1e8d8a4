"""Load-test helpers: agent sessions driven over HTTP through an OpenAI-compatible endpoint, and what they measure.

Each session is a conversation whose history grows by a tool result and a canned reply every turn (the KV worth
keeping; the model's own reply is not kept, so every side is sent the same prompts), sent at a fixed
pace (`turn_period_s`, one turn in flight per session, a turn that runs late is followed at once) with a seeded
random start phase, as independent agents of a workflow run. When the prompt nears the model's length the session
compacts (system prompt plus a summary line), as agents do. Every turn is recorded with the replica that served it
(`X-KVSched-Replica`: the router's slot for it, where the session lives; `X-KVSched-Replica-Id`: Ray's id) and the
ingress's attempt count (`X-KVSched-Attempts`).

Outcomes: `ok`; `failed` (an HTTP error before any byte of the answer); `cut` (a stream that had started, then ended
with the OpenAI error event: the one failure kvsched does not retry, counted apart).
The tiny model's outputs are noise; its timings are CPU timings of a 2-layer model, not GPU figures.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from kvsched.bench.common import percentile


@dataclass(frozen=True, slots=True)
class LoadConfig:
    sessions: int = 16
    duration_s: float = 60.0
    turn_period_s: float = 1.0
    max_tokens: int = 8
    prompt_budget_tokens: int = 384  # compact the history past this many prompt tokens
    seed: int = 0
    model: str = "tiny"
    # Past `duration_s`, go on until this many turns are answered (a slow or loaded engine answers fewer per second,
    # and a measurement needs its weight), but never past `max_duration_s`.
    min_answered: int = 0
    max_duration_s: float | None = None


@dataclass(frozen=True, slots=True)
class Turn:
    session: str
    index: int
    sent_s: float  # seconds since the run started
    outcome: str  # ok | failed | cut
    slot: str | None = None
    replica_id: str | None = None
    attempts: int = 1
    ttft_ms: float | None = None
    error: str | None = None


def session_ids(n: int) -> list[str]:
    return [f"wf{i}/worker-{i % 3}" for i in range(n)]


def tool_result(rng: random.Random, turn: int) -> str:
    rows = " ".join(f"row{rng.randrange(1000)}={rng.randrange(10**4)}" for _ in range(8))
    return f"tool result {turn}: {rows}"


def canned_reply(turn: int) -> str:
    """The assistant message the client keeps in the history for `turn`, whatever the model answered: every router
    and side sends the same prompts (as `bench agents` does). Found by review: the tiny model's reply, sampled at
    temperature 1 unseeded, went into the history, so the sides compared were sent different prompts."""
    return f"Noted the rows of tool result {turn}."


class Stopper:
    """When the sessions stop (`stop_at`, time.monotonic()); a side task may move it. Past it, sessions go on while
    fewer than `min_answered` turns were answered, until `hard_stop_at`."""

    def __init__(self, stop_at: float, min_answered: int = 0, hard_stop_at: float | None = None) -> None:
        self.stop_at = stop_at
        self.min_answered = min_answered
        self.hard_stop_at = stop_at if hard_stop_at is None else max(stop_at, hard_stop_at)
        self._answered = itertools.count()
        self.answered = 0

    def count_answered(self) -> None:
        self.answered = next(self._answered) + 1  # itertools.count: one atomic step under the GIL

    def over(self, t: float) -> bool:
        """Should a turn due at `t` not be sent?"""
        if t < self.stop_at:
            return False
        return self.answered >= self.min_answered or t >= max(self.hard_stop_at, self.stop_at)


def run_session(client: Any, sid: str, cfg: LoadConfig, t0: float, stopper: Stopper) -> list[Turn]:
    """One session's turns in order until `stopper.stop_at`."""
    import openai

    rng = random.Random(f"{cfg.seed}/{sid}")
    system = {"role": "system", "content": f"You are agent {sid}. Use the tools; keep notes short."}
    msgs: list[dict[str, str]] = [system]
    out: list[Turn] = []
    next_at = t0 + rng.uniform(0, cfg.turn_period_s)
    i = 0
    while True:
        now = time.monotonic()
        if stopper.over(next_at):
            return out
        if next_at > now:
            time.sleep(next_at - now)
        sent = time.monotonic()
        next_at = sent + cfg.turn_period_s
        msgs.append({"role": "user", "content": tool_result(rng, i)})
        row, _text, prompt_tokens = _turn(client, sid, msgs, cfg, sent - t0, i, openai)
        out.append(row)
        if row.outcome == "ok":
            stopper.count_answered()
            msgs.append({"role": "assistant", "content": canned_reply(i)})  # not `text`: the same prompts everywhere
            if prompt_tokens > cfg.prompt_budget_tokens:
                msgs = [system, {"role": "user", "content": f"summary of turns up to {i}: rows noted."}]
        else:
            msgs.pop()  # the turn is retried as the next turn, as an agent would
        i += 1


def _turn(client: Any, sid: str, msgs: list[dict[str, str]], cfg: LoadConfig, sent_s: float, i: int,
          openai: Any) -> tuple[Turn, str, int]:
    t_send = time.perf_counter()
    started = False
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=cfg.model, messages=msgs, max_tokens=cfg.max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_headers={"X-Session-Id": sid})
        started = True
        head = {"slot": raw.headers.get("x-kvsched-replica"), "replica_id": raw.headers.get("x-kvsched-replica-id"),
                "attempts": int(raw.headers.get("x-kvsched-attempts", "1"))}
        first: float | None = None
        text: list[str] = []
        prompt_tokens = 0
        for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                prompt_tokens = chunk.usage.prompt_tokens
    except openai.APIError as exc:
        outcome = "cut" if started else "failed"
        return Turn(sid, i, sent_s, outcome, error=f"{type(exc).__name__}: {exc}"[:300]), "", 0
    ttft = (first - t_send) * 1000 if first is not None else None
    return Turn(sid, i, sent_s, "ok", ttft_ms=ttft, **head), "".join(text), prompt_tokens


def drive(base_url: str, cfg: LoadConfig, on_started: Any = None) -> tuple[list[Turn], float]:
    """All sessions at once, one thread each, for `cfg.duration_s`; `on_started(t0, stopper)` runs in its own thread
    beside them (e.g. a kill) and may move the end. Returns every turn and the start time (time.monotonic())."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    t0 = time.monotonic()
    hard = t0 + cfg.max_duration_s if cfg.max_duration_s is not None else None
    stopper = Stopper(t0 + cfg.duration_s, cfg.min_answered, hard)
    side = threading.Thread(target=on_started, args=(t0, stopper), daemon=True) if on_started else None
    if side:
        side.start()
    with ThreadPoolExecutor(max_workers=cfg.sessions) as pool:
        results = list(pool.map(lambda sid: run_session(client, sid, cfg, t0, stopper), session_ids(cfg.sessions)))
    if side:
        side.join()
    return [t for rows in results for t in rows], t0


def summarize(turns: Sequence[Turn], replicas: int = 2) -> dict[str, Any]:
    """`affinity`: follow-up turns served by the slot that served the session's previous answered turn (where its
    KV is); `max_over_mean_load`: answered requests of the busiest slot over the mean of `replicas` slots."""
    by_session: dict[str, list[Turn]] = {}
    for t in sorted(turns, key=lambda t: (t.session, t.index)):
        by_session.setdefault(t.session, []).append(t)
    hits = follow_ups = 0
    served: Counter[str] = Counter()
    ttft: list[float] = []
    for rows in by_session.values():
        prev: str | None = None
        for t in rows:
            if t.outcome != "ok" or t.slot is None:
                continue
            served[t.slot] += 1
            if prev is not None:
                follow_ups += 1
                hits += t.slot == prev
                if t.ttft_ms is not None:
                    ttft.append(t.ttft_ms)
            prev = t.slot
    loads = list(served.values()) + [0] * max(0, replicas - len(served))
    mean = sum(loads) / len(loads) if loads else 0.0
    outcomes = Counter(t.outcome for t in turns)
    return {"affinity": hits / follow_ups if follow_ups else None, "follow_ups": follow_ups,
            "moves": {"total": follow_ups - hits},
            "max_over_mean_load": max(loads) / mean if mean else None, "requests_per_replica": dict(served),
            "requests": len(turns), "failed": outcomes["failed"], "cut_streams": outcomes["cut"],
            "retried": sum(t.attempts > 1 for t in turns),
            "follow_up_ttft_ms_p50": percentile(ttft, 0.5), "follow_up_ttft_ms_p95": percentile(ttft, 0.95)}
