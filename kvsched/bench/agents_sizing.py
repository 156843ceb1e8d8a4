"""What `kvsched bench agents` sizes its servers by: the workload's working set in tokens (its pools follow from it and
--pressure), and every side's KV memory against this host's before any server starts (`replay_memory`, which
`kvsched bench replay` refuses by too)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kvsched.bench.agents_driver import prompt_messages
from kvsched.sim.workload import Workflow


def count_tokens(model_dir: Path, workflows: list[Workflow]) -> tuple[int, int]:
    """(working set, longest context) in tokens: every agent's final request rendered with the chat template, the
    shared system prompt counted once (prefix caching stores it once)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    total = longest = sessions = 0
    system = ""
    for wf in workflows:
        for agent in wf.agents():
            last = prompt_messages(agent.system, agent.turns, len(agent.turns) - 1)
            text = tok.apply_chat_template(last, add_generation_prompt=True, tokenize=False)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            total += n
            longest = max(longest, n)
            sessions += 1
            system = agent.system
    shared = len(tok(tok.apply_chat_template([{"role": "system", "content": system}], tokenize=False),
                     add_special_tokens=False)["input_ids"])
    return total - max(sessions - 1, 0) * shared, longest


def refuse_past_host(pressure: float, sides: Sequence[str], specs: Mapping[str, Any],
                     side_config: Mapping[str, Mapping[str, Any]], shape: Any, dtype: str) -> None:
    """HostMemoryError (`replay_memory.refuse_past_host`) when the sides' servers, all started at once and run in the
    order of `sides`, would hold more KV memory than this host has: every side's pool (`specs`: its ServerSpec) in
    the model's `dtype`, and a kvsched side's FP8 tier at the size its engine reads (`side_config`:
    `engine_settings.side_settings`, its `fp8_tier_gib`). Found by review: the agents benchmark had no such refusal."""
    from kvsched.bench import replay_memory

    block_tokens = next(iter(specs.values())).block_size
    memory = [replay_memory.side_memory(name, specs[name].num_blocks, side_config[name].get("fp8_tier_gib"), shape,
                                        dtype, block_tokens) for name in sides]
    replay_memory.refuse_past_host(pressure, memory, block_tokens * shape.kv_bytes_per_token(dtype))
