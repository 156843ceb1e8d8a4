"""Seeded multi-agent workloads: workflows of agents (sessions) whose turns append tool results and wait on tools.

The same workload model drives `kvsched bench agents` (over HTTP, as chat messages) and can be replayed in token
space. Topologies follow the sizing guide: flat (independent agents), hierarchical (an orchestrator fans out to N
workers each round and gathers their results), pipeline (agents hand off in sequence, one stage active at a time).
Everything is decided up front from the seed, so two runs (stock vs kvsched) send identical requests at the same
moments relative to their workflow's start.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum


class Topology(StrEnum):
    FLAT = "flat"
    HIERARCHICAL = "hierarchical"
    PIPELINE = "pipeline"


VOCAB = (
    "agent tool call result session turn context memory cache block token prefix model server request response "
    "orchestrator worker planner summary search page document file query answer plan step task user system data "
    "report table value error retry latency budget time score read write open list find compute return status next "
    "first last python code test run build config option path key name type number string true false"
).split()


@dataclass(frozen=True, slots=True)
class WorkloadConfig:
    workflows: int = 4
    topology: Topology = Topology.HIERARCHICAL
    workers: int = 3  # per workflow (hierarchical: besides the orchestrator; flat: agents; pipeline: stages)
    rounds: int = 3  # orchestrator rounds (hierarchical) / turns per agent (flat, pipeline)
    worker_turns: int = 2  # turns each worker runs per round (hierarchical)
    system_words: int = 120  # shared system prompt length
    brief_words: int = 300  # the agent's own task brief / retrieved documents, sent with its first turn
    tool_words: int = 100  # words of one tool result (~1.5 tokens each on the tiny tokenizer)
    tool_latency_s: tuple[float, float] = (1.5, 2.5)  # uniform range of one tool call (~2 s, as in the brief)
    think_words: int = 12  # canned assistant text appended per turn (identical on every side)
    max_tokens: int = 8  # generated tokens per turn
    stagger_s: float = 0.3  # workflow start offsets
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Turn:
    """One request of one agent: append `user` to the history, wait `delay_s` before sending."""

    user: str
    assistant: str  # what the client records as the assistant's reply (canned, so histories are identical)
    delay_s: float


@dataclass(slots=True)
class AgentScript:
    session_id: str
    role: str
    system: str
    turns: list[Turn] = field(default_factory=list)


@dataclass(slots=True)
class Phase:
    """Agents that run concurrently; the next phase starts when all of them are done."""

    agents: list[AgentScript]
    turn_slice: tuple[int, int] | None = None  # run only these turns of each agent (hierarchical rounds)


@dataclass(slots=True)
class Workflow:
    workflow_id: str
    start_s: float
    phases: list[Phase]

    def agents(self) -> list[AgentScript]:
        seen: dict[str, AgentScript] = {}
        for phase in self.phases:
            for a in phase.agents:
                seen.setdefault(a.session_id, a)
        return list(seen.values())


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def shared_system_prompt(cfg: WorkloadConfig) -> str:
    rng = random.Random(cfg.seed * 7919 + 1)
    return "You are an agent in a team. Follow the plan and use the tools. " + _words(rng, cfg.system_words)


def generate(cfg: WorkloadConfig) -> list[Workflow]:
    rng = random.Random(cfg.seed)
    system = shared_system_prompt(cfg)

    def turn(kind: str, first: bool = False) -> Turn:
        user = f"[{kind}] " + _words(rng, cfg.tool_words)
        if first:
            user = "[brief] " + _words(rng, cfg.brief_words) + "\n" + user
        lo, hi = cfg.tool_latency_s
        return Turn(user=user, assistant=_words(rng, cfg.think_words), delay_s=rng.uniform(lo, hi))

    workflows = []
    for w in range(cfg.workflows):
        wid = f"wf{cfg.seed}-{w}"
        phases: list[Phase] = []
        if cfg.topology is Topology.HIERARCHICAL:
            orch = AgentScript(f"{wid}/orchestrator", "orchestrator", system)
            workers = [AgentScript(f"{wid}/worker-{i}", "worker", system) for i in range(cfg.workers)]
            for r in range(cfg.rounds):
                orch.turns.append(turn("plan", first=True) if r == 0 else turn("gather"))
                phases.append(Phase([orch], (r, r + 1)))
                for wk in workers:
                    wk.turns.extend(turn("tool result", first=not wk.turns) for _ in range(cfg.worker_turns))
                k = cfg.worker_turns
                phases.append(Phase(workers, (r * k, (r + 1) * k)))
        elif cfg.topology is Topology.FLAT:
            agents = [AgentScript(f"{wid}/agent-{i}", "worker", system) for i in range(cfg.workers)]
            for a in agents:
                a.turns.extend(turn("tool result", first=t == 0) for t in range(cfg.rounds))
            phases.append(Phase(agents))
        else:
            for s in range(cfg.workers):
                stage = AgentScript(f"{wid}/stage-{s}", "worker", system)
                stage.turns.extend(turn("handoff", first=True) if t == 0 else turn("tool result")
                                   for t in range(cfg.rounds))
                phases.append(Phase([stage]))
        workflows.append(Workflow(wid, start_s=w * cfg.stagger_s, phases=phases))
    return workflows


def final_history_words(agent: AgentScript) -> int:
    """Words in an agent's last request (its peak context), for sizing the KV pool against the working set."""
    return len(agent.system.split()) + sum(len(t.user.split()) + len(t.assistant.split()) for t in agent.turns)
