"""Plays a multi-agent workload against an OpenAI-compatible server with the real `openai` client, streaming.

Each agent is a session (named as `--session-header` says: kvsched.bench.agents_naming); each turn appends a tool
result to the agent's history and waits the tool's latency first. TTFT is client-side: from sending the request to the first streamed content chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvsched.bench.agents_naming import session_fields
from kvsched.sim.workload import AgentScript, Phase, Turn, Workflow

TTL_HINT_S = 60.0  # the X-Session-TTL every turn carries: longer than any tool call of the workloads


@dataclass(slots=True)
class TurnRecord:
    session_id: str
    turn_index: int
    ttft_s: float | None
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    sent_s: float = 0.0  # when the request was sent, seconds after the run started (for replaying the arrivals)


@dataclass(slots=True)
class RunRecord:
    turns: list[TurnRecord] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def errors(self) -> int:
        return sum(1 for t in self.turns if t.error)


def prompt_messages(system: str, turns: Sequence[Turn], idx: int) -> list[dict[str, str]]:
    """What turn `idx` of an agent sends: the system prompt, every earlier turn's user message and the canned
    assistant reply the client recorded for it (identical on every side), then this turn's user message."""
    msgs = [{"role": "system", "content": system}]
    for t in turns[:idx]:
        msgs += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
    msgs.append({"role": "user", "content": turns[idx].user})
    return msgs


class AgentDriver:
    def __init__(self, base_url: str, model: str, max_tokens: int, api_key: str = "none", ttl_hint_s: float = TTL_HINT_S,
                 on_turn: Callable[[TurnRecord], None] | None = None, request_timeout_s: float = 300.0,
                 naming: str = "header") -> None:
        from openai import AsyncOpenAI

        self.client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=request_timeout_s)
        self.model = model
        self.max_tokens = max_tokens
        self.ttl_hint_s = ttl_hint_s
        self.on_turn = on_turn
        self.naming = naming  # how sessions are named (kvsched.bench.agents_naming)
        self.t0 = time.perf_counter()

    async def run(self, workflows: list[Workflow]) -> RunRecord:
        record = RunRecord()
        self.t0 = t0 = time.perf_counter()
        await asyncio.gather(*(self._workflow(w, record) for w in workflows))
        record.wall_s = time.perf_counter() - t0
        await self.client.close()
        return record

    async def _workflow(self, wf: Workflow, record: RunRecord) -> None:
        await asyncio.sleep(wf.start_s)
        for phase in wf.phases:
            await asyncio.gather(*(self._agent(a, phase, record) for a in phase.agents))

    async def _agent(self, agent: AgentScript, phase: Phase, record: RunRecord) -> None:
        lo, hi = phase.turn_slice or (0, len(agent.turns))
        for idx in range(lo, min(hi, len(agent.turns))):
            await asyncio.sleep(agent.turns[idx].delay_s)
            last = idx == len(agent.turns) - 1
            rec = await self._send(agent, idx, prompt_messages(agent.system, agent.turns, idx), last)
            record.turns.append(rec)
            if self.on_turn:
                self.on_turn(rec)

    async def _send(self, agent: AgentScript, idx: int, messages: list[dict[str, str]], last: bool) -> TurnRecord:
        headers, fields = session_fields(self.naming, agent.session_id, agent.role, self.ttl_hint_s, last)
        start = time.perf_counter()
        ttft: float | None = None
        prompt_tokens = completion_tokens = 0
        try:
            stream = await self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=0.0, stream=True,
                stream_options={"include_usage": True}, extra_headers=headers,
                extra_body={"ignore_eos": True, **fields})
            async for chunk in stream:
                if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                    ttft = time.perf_counter() - start
                if chunk.usage is not None:
                    prompt_tokens = chunk.usage.prompt_tokens
                    completion_tokens = chunk.usage.completion_tokens
        except Exception as exc:  # counted, reported; the workflow goes on
            return TurnRecord(agent.session_id, idx, None, time.perf_counter() - start, 0, 0,
                              error=f"{type(exc).__name__}: {exc}"[:300], sent_s=start - self.t0)
        return TurnRecord(agent.session_id, idx, ttft, time.perf_counter() - start, prompt_tokens, completion_tokens,
                          sent_s=start - self.t0)


def run_with_progress(url: str, model: str, max_tokens: int, workflows: list[Workflow], label: str,
                      progress: bool, naming: str = "header") -> RunRecord:
    """Drive `workflows` through the server at `url`, with a per-turn progress bar when `progress` is set."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(a.turns) for wf in workflows for a in wf.agents()), desc=f"{label:>14}", unit="turn",
                   leave=True)
    driver = AgentDriver(url, model, max_tokens, on_turn=(lambda _r: bar.update(1)) if bar else None, naming=naming)
    try:
        return asyncio.run(driver.run(workflows))
    finally:
        if bar:
            bar.close()
