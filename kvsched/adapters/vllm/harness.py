"""Drive a real vLLM scheduler (stock or kvsched's) without a model: the engine loop with a fake model runner.

Used where the scheduler's own behaviour is the subject: the block-accounting invariant tests and
`kvsched bench sched` (per-step scheduler overhead). The scheduler, KV cache manager and block pool are vLLM's own;
only the forward pass is replaced by "every scheduled request samples token 7".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOCK_SCHEDULER = "vllm.v1.core.sched.async_scheduler.AsyncScheduler"
KVSCHED_SCHEDULER = "kvsched.adapters.vllm.scheduler.KVSchedScheduler"
FAKE_TOKEN = 7


@dataclass(frozen=True, slots=True)
class HarnessConfig:
    model_dir: Path
    num_blocks: int = 256
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    kv_transfer_config: dict[str, Any] | None = None  # e.g. kvsched's FP8 tier (scheduler side only: no worker here)
    # A hybrid layout (Gemma-3, gpt-oss): odd layers slide over this many tokens, even ones attend to everything, one
    # KV-cache group each; the sliding group first when `sliding_first` (models whose layer 0 slides).
    sliding_window: int | None = None
    sliding_first: bool = False
    prefix_caching: bool = True  # off: as `--no-enable-prefix-caching`, or vLLM turning it off for a model


def build_scheduler(scheduler_cls: str | type, cfg: HarnessConfig) -> Any:
    """A vLLM scheduler over a KV pool of `cfg.num_blocks` blocks shaped like the model's layers."""
    import torch
    from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec
    from vllm.v1.structured_output import StructuredOutputManager

    cls = resolve_obj_by_qualname(scheduler_cls) if isinstance(scheduler_cls, str) else scheduler_cls
    model_config = ModelConfig(model=str(cfg.model_dir), dtype="bfloat16", seed=0, skip_tokenizer_init=True,
                               max_model_len=cfg.max_model_len)
    scheduler_config = SchedulerConfig(
        max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
        max_model_len=cfg.max_model_len, enable_chunked_prefill=True, is_encoder_decoder=False,
    )
    cache_config = CacheConfig(block_size=cfg.block_size, cache_dtype="auto", enable_prefix_caching=cfg.prefix_caching)
    kv_transfer = KVTransferConfig(**cfg.kv_transfer_config) if cfg.kv_transfer_config else None
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config, cache_config=cache_config,
                             kv_transfer_config=kv_transfer)
    hf = model_config.hf_config
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(hf.num_hidden_layers)]
    shape = {"block_size": cfg.block_size, "num_kv_heads": hf.num_key_value_heads,
             "head_size": hf.hidden_size // hf.num_attention_heads, "dtype": torch.bfloat16}
    groups = [KVCacheGroupSpec(layers, FullAttentionSpec(**shape))]
    if cfg.sliding_window is not None:
        groups = [KVCacheGroupSpec(layers[::2], FullAttentionSpec(**shape)),
                  KVCacheGroupSpec(layers[1::2], SlidingWindowSpec(**shape, sliding_window=cfg.sliding_window))]
        groups = groups[::-1] if cfg.sliding_first else groups
    kv_cache_config = KVCacheConfig(num_blocks=cfg.num_blocks, kv_cache_tensors=[], kv_cache_groups=groups)
    cache_config.num_gpu_blocks = cfg.num_blocks
    return cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config, log_stats=True,
               structured_output_manager=StructuredOutputManager(vllm_config), block_size=cfg.block_size)


class RequestFactory:
    """Makes vLLM `Request`s with block hashes, as the engine's input processor would."""

    def __init__(self, block_size: int) -> None:
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

        init_none_hash(sha256)
        self._hasher = get_request_block_hasher(block_size, sha256)
        self._ids = itertools.count()

    def make(self, prompt: list[int], max_tokens: int, session_id: str | None = None,
             xargs: dict[str, Any] | None = None, cache_salt: str | None = None, request_id: str | None = None,
             resumable: bool = False) -> Any:
        from vllm.sampling_params import SamplingParams
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=dict(xargs or {}) or None)
        return Request(request_id=request_id or f"r{next(self._ids)}", prompt_token_ids=list(prompt),
                       sampling_params=params, pooling_params=None, block_hasher=self._hasher,
                       cache_salt=cache_salt, session_id=session_id, resumable=resumable)


def step(scheduler: Any, worker: Callable[[Any], Any] | None = None,
         sample: Callable[[str], int] | None = None) -> tuple[Any, Any]:
    """One engine step: schedule, 'run' the model (token 7 for every request that finished its prefill chunk, or
    `sample(request_id)`: two users' answers to one prompt that differ). `worker(scheduler_output)`, when given,
    plays the KV connector's worker side and returns its `KVConnectorOutput`."""
    from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

    out = scheduler.schedule()
    connector_output = worker(out) if worker is not None else None
    req_ids = list(out.num_scheduled_tokens)
    sampled = []
    for rid in req_ids:
        # the scheduler itself marks whether this step completes the request's prefill (and so samples a token)
        sampled.append([] if scheduler.requests[rid].is_prefill_chunk else [sample(rid) if sample else FAKE_TOKEN])
    runner_out = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                   sampled_token_ids=sampled,
                                   # the step's worker report, as a worker with a KV connector sends every step
                                   kv_connector_output=connector_output or (KVConnectorOutput() if scheduler.connector
                                                                            else None))
    return out, scheduler.update_from_output(out, runner_out)


@dataclass(slots=True)
class PrefillCounts:
    """Prompt tokens of newly scheduled requests, and how many of them came from the prefix cache."""

    prompt_tokens: int = 0
    cached_tokens: int = 0

    def record(self, scheduler_output: Any, scheduler: Any) -> None:
        for new in scheduler_output.scheduled_new_reqs:
            self.prompt_tokens += len(new.prompt_token_ids or ())
            self.cached_tokens += int(new.num_computed_tokens)


def run_until_idle(scheduler: Any, max_steps: int = 10_000, counts: PrefillCounts | None = None) -> int:
    steps = 0
    while scheduler.has_requests() and steps < max_steps:
        out, _ = step(scheduler)
        if counts is not None:
            counts.record(out, scheduler)
        steps += 1
    if scheduler.has_requests():
        raise RuntimeError(f"scheduler still busy after {max_steps} steps")
    return steps


def free_blocks(scheduler: Any) -> int:
    return int(scheduler.kv_cache_manager.block_pool.get_num_free_blocks())


def usable_blocks(scheduler: Any) -> int:
    return int(scheduler.kv_cache_manager.block_pool.num_gpu_blocks) - 1
