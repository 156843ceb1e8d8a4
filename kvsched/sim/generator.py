"""Seeded multi-agent traces at any scale, in token-block space (the workload model of `kvsched.sim.workload`).

Workflows of agents (sessions) follow the sizing guide's topologies: flat (independent agents), hierarchical (an
orchestrator turn, then its N workers run a few tool turns each, then the orchestrator gathers), pipeline (stages hand
off in sequence). Every request re-sends its session's whole history plus the new tool result; every agent starts with
the shared system prompt and its role's prompt, so those blocks are shared across sessions exactly.

Times are closed-loop on a nominal server (prefill of the new tokens at `nominal_prefill_tps`, decode at
`nominal_tpot_s` per token): a turn is sent one tool latency (plus think time) after the previous one finished, an
agent-to-agent hand-off costs one hop. The replay then keeps these send times fixed for every policy (paired), which
is also what the clairvoyant bound needs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from kvsched.sim.trace import Trace, TraceRequest, computed_blocks
from kvsched.sim.workload import Topology


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """A multi-agent workload in tokens. Ranges are (low, high) uniform unless said otherwise; seconds and tokens."""

    topology: Topology = Topology.HIERARCHICAL
    workflows: int = 200
    workers: int = 4  # hierarchical: workers per orchestrator; flat: agents; pipeline: stages
    rounds: int = 10  # orchestrator turns (hierarchical) / turns per agent (flat, pipeline)
    worker_turns: int = 5  # tool turns a worker runs per round (hierarchical)
    block_size: int = 16
    system_tokens: int = 1500  # shared by every agent of every workflow
    role_prompt_tokens: int = 500  # shared by the agents of one role
    brief_tokens: tuple[int, int] = (1000, 4000)  # the agent's task brief / retrieved pages, in its first turn
    session_tokens: tuple[int, int] = (30_000, 50_000)  # context an agent reaches by its last turn (target)
    tool_sigma: float = 0.5  # lognormal spread of one tool result around the size that reaches the target
    output_tokens: tuple[int, int] = (64, 256)  # generated per turn; re-sent in the next turn's prompt
    tool_latency_s: tuple[float, float] = (2.0, 0.6)  # lognormal (median, sigma) of one tool call
    think_s: tuple[float, float] = (0.0, 0.5)  # client-side pause before a turn, on top of the tool latency
    hop_s: tuple[float, float] = (0.005, 0.05)  # agent-to-agent hand-off
    arrival_window_s: float = 30.0  # workflows start uniformly over this window
    ttl_s: float | None = 60.0  # the session TTL hint every request carries (None: no hint)
    nominal_prefill_tps: float = 10_000.0
    nominal_tpot_s: float = 0.02
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["topology"] = self.topology.value
        return d


QUICK = TraceConfig(workflows=8, workers=4, rounds=3, worker_turns=4, session_tokens=(12_000, 20_000),
                    brief_tokens=(1000, 3000), arrival_window_s=5.0)
FLEET = TraceConfig(topology=Topology.FLAT, workflows=200, workers=5, rounds=50)  # 1,000 sessions x 50 turns


class _Agent:
    """One session's history: its token count and the ids of its full blocks."""

    def __init__(self, gen: _Generator, session: str, role: str, turns: int) -> None:
        cfg = gen.cfg
        self.gen, self.session, self.role, self.turns_left = gen, session, role, turns
        self.tokens = cfg.system_tokens + cfg.role_prompt_tokens
        self.ids: list[int] = list(gen.role_prefix(role))
        self.sent = 0  # blocks of the previous request
        target = gen.rng.uniform(*cfg.session_tokens)
        self.brief = gen.rng.randint(*cfg.brief_tokens)
        out_mean = sum(cfg.output_tokens) / 2
        self.tool_mean = max((target - self.tokens - self.brief) / turns - out_mean, float(cfg.block_size))

    def request(self, t: float) -> tuple[TraceRequest, float]:
        """The agent's next turn sent at `t`, and when the nominal server finishes it."""
        cfg, rng = self.gen.cfg, self.gen.rng
        s = cfg.tool_sigma
        new = max(1, int(self.tool_mean * math.exp(rng.gauss(-s * s / 2, s))))
        if self.sent == 0:
            new += self.brief
        out = rng.randint(*cfg.output_tokens)
        prompt = self.tokens + new
        n = computed_blocks(prompt, out, cfg.block_size)  # not the block the last sampled token completes
        self.ids.extend(self.gen.fresh(n - len(self.ids)))
        self.turns_left -= 1
        req = TraceRequest(t=t, session=self.session, prompt_tokens=prompt, output_tokens=out,
                           blocks=self.ids[self.sent:n], reuse=self.sent, role=self.role, ttl_s=cfg.ttl_s,
                           end=self.turns_left == 0)
        self.sent, self.tokens = n, prompt + out
        return req, t + new / cfg.nominal_prefill_tps + out * cfg.nominal_tpot_s

    def gap(self) -> float:
        cfg, rng = self.gen.cfg, self.gen.rng
        med, sigma = cfg.tool_latency_s
        return med * math.exp(rng.gauss(0.0, sigma)) + rng.uniform(*cfg.think_s)


class _Generator:
    def __init__(self, cfg: TraceConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.next_id = 0
        self.common = self.fresh(cfg.system_tokens // cfg.block_size)
        self.roles: dict[str, list[int]] = {}

    def fresh(self, n: int) -> list[int]:
        out = list(range(self.next_id, self.next_id + max(n, 0)))
        self.next_id += max(n, 0)
        return out

    def role_prefix(self, role: str) -> list[int]:
        """Full blocks of system prompt + role prompt (the block straddling the two belongs to the role)."""
        if role not in self.roles:
            cfg = self.cfg
            self.roles[role] = self.common + self.fresh(
                (cfg.system_tokens + cfg.role_prompt_tokens) // cfg.block_size - len(self.common))
        return self.roles[role]

    def hop(self) -> float:
        return self.rng.uniform(*self.cfg.hop_s)

    def run_agent_turns(self, agent: _Agent, t: float, turns: int) -> Iterator[tuple[TraceRequest, float]]:
        for i in range(turns):
            if i:
                t += agent.gap()
            req, t = agent.request(t)
            yield req, t

    def workflow(self, w: int) -> Iterator[TraceRequest]:
        cfg = self.cfg
        wid = f"wf{cfg.seed}-{w}"
        t = self.rng.uniform(0.0, cfg.arrival_window_s)
        if cfg.topology is Topology.HIERARCHICAL:
            orch = _Agent(self, f"{wid}/orchestrator", "orchestrator", cfg.rounds)
            workers = [_Agent(self, f"{wid}/worker-{i}", "worker", cfg.rounds * cfg.worker_turns)
                       for i in range(cfg.workers)]
            for _ in range(cfg.rounds):
                req, t = orch.request(t + self.hop())
                yield req
                end = t
                for wk in workers:
                    for req, finished in self.run_agent_turns(wk, t + self.hop(), cfg.worker_turns):
                        yield req
                        end = max(end, finished)
                t = end
        elif cfg.topology is Topology.FLAT:
            for i in range(cfg.workers):
                agent = _Agent(self, f"{wid}/agent-{i}", "worker", cfg.rounds)
                for req, _ in self.run_agent_turns(agent, t + self.hop(), cfg.rounds):
                    yield req
        else:
            for s in range(cfg.workers):
                stage = _Agent(self, f"{wid}/stage-{s}", "worker", cfg.rounds)
                start = t + self.hop()
                for req, finished in self.run_agent_turns(stage, start, cfg.rounds):
                    yield req
                    t = finished


def generate_requests(cfg: TraceConfig) -> Iterator[TraceRequest]:
    """Every request of the workload, workflow by workflow (each session's turns in order); ids are dense ints."""
    gen = _Generator(cfg)
    for w in range(cfg.workflows):
        yield from gen.workflow(w)


def generate(cfg: TraceConfig) -> Trace:
    return Trace.from_requests(cfg.block_size, generate_requests(cfg), meta={"generator": cfg.as_dict()},
                               dense_ids=True)
