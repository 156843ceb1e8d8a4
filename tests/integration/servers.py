"""The package's servers that several modules each start once: the hardened shared one (security, zero-change
clients, fuzz), compaction's (test_compaction and test_compaction_templates), stock vLLM's (trace replay, the stock
server of test_serve, the tiny model's capacity in test_plan_vllm, what test_fp8_tier's restored turns must decode
like) and the fp8 KV cache's (test_fp8_kv, and the tier over an fp8 cache in test_fp8_tier). One start-up each
instead of one per module: a start-up is ~30 CPU-seconds.
`conftest.launched` spawns them together when the first is needed, so their start-ups overlap (three single-threaded
Python imports each); a server waiting idle takes no CPU."""

from __future__ import annotations

from pathlib import Path

from kvsched.ops.cpu_features import cpu_features
from kvsched.serving import ServerSpec
from tests.integration.secure import ENV as SECURE_ENV
from tests.integration.secure import KEYS
from tests.vllm_layout import DEFAULT_LAYOUT, worker

COMPACTION_TRIGGER = 300
COMPACTION_MAX_MODEL_LEN = 4096
COMPACTION_ENV = {
    "KVSCHED_COMPACTION": "summarize", "KVSCHED_COMPACTION_TRIGGER_TOKENS": str(COMPACTION_TRIGGER),
    "KVSCHED_COMPACTION_KEEP_RECENT_MESSAGES": "2", "KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS": "48",
    "KVSCHED_COMPACTION_WAIT_FOR_SUMMARY": "1", "KVSCHED_COMPACTION_CAP_TOKENS": "1000",
    "KVSCHED_COMPACTION_RETRY_AFTER_S": "600", "KVSCHED_COMPACTION_CLIENT_STRATEGIES": "sliding_window,cap"}
FP8_POOL_BLOCKS = 48
FP8_MAX_LEN = (FP8_POOL_BLOCKS - 1) * 32  # test_fp8_tier.MAX_LEN: one request may fill every block of the 48 but one
FP8_TP_TIER_GIB = 0.05
COMPACTION_TEMPLATE_ARGS = ["--trust-request-chat-template", "--enable-auto-tool-choice", "--tool-call-parser",
                            "pythonic"]


def package_specs(model: Path, recording: Path) -> dict[str, ServerSpec]:
    """`recording`: where the shared server records the requests it serves (KVSCHED_RECORD_TRACE; test_trace_recording
    reads its own requests back)."""
    specs = {
        # with vLLM's request-id headers (test_request_ids: kvsched's own answers carry them as vLLM's do) and each
        # request's prefix-cache hits in its usage (test_soak checks that a fresh cache_salt's first request gets none;
        # the flag only adds usage.prompt_tokens_details)
        "secure": ServerSpec(model=model, scheduler="kvsched", max_model_len=1024, num_blocks=48,
                             extra_args=["--api-key", *KEYS, "--enable-request-id-headers",
                                         "--enable-prompt-tokens-details"],
                             env={**SECURE_ENV, "KVSCHED_RECORD_TRACE": str(recording)}, worker=worker()),
        # compaction's, and the strict chat templates' (test_compaction_templates sends its templates and tools; the
        # flags change nothing for requests without them): one start-up for both modules
        "compaction": ServerSpec(model=model, scheduler="kvsched", max_model_len=COMPACTION_MAX_MODEL_LEN,
                                 num_blocks=400, env=COMPACTION_ENV, extra_args=COMPACTION_TEMPLATE_ARGS,
                                 worker=worker()),
        # stock vLLM: `kvsched bench replay`'s prompts (test_trace_replay: one engine block per trace block), stock
        # vLLM without the flag (test_serve) and the KV pool vLLM sizes itself from 1 GiB of bf16 cache with its log
        # line at INFO (test_plan_vllm: no --num-gpu-blocks-override, the dtype the planner is checked for), and the
        # tiny model recomputed in the dtype of test_fp8_tier's tiers (what a restored turn must decode exactly like)
        "replay": ServerSpec(model=model, scheduler=None, max_model_len=1024, block_size=32, kv_cache_gib=1,
                             served_model_name="replay", dtype="bfloat16",
                             env={"VLLM_LOGGING_LEVEL": "INFO", "VLLM_CPU_KVCACHE_SPACE": "1"}, worker=worker()),
    }
    if not cpu_features().fp8_kv_cache_refusal():  # test_fp8_kv and test_fp8_tier's fp8 test skip without it
        # test_fp8_tier's tier over an fp8 cache too: its tier, its admin key and a length that lets one request
        # take every block of the pool but one (test_fp8_tier.flood)
        specs["fp8_kv"] = ServerSpec(model=model, scheduler="kvsched", max_model_len=FP8_MAX_LEN, num_blocks=48,
                                     extra_args=["--kv-cache-dtype", "fp8", "--kvsched-fp8-tier-gb", "0.05"],
                                     env={"KVSCHED_ADMIN_KEYS": "tier-admin"}, worker=worker())
    return specs


def fp8_tier_specs(model: Path) -> dict[str, ServerSpec]:
    """test_fp8_tier's own servers (its `servers` fixture), started together: the tier (its worker in a process of its
    own, as the CPU build runs it), a tier whose every slot is corrupted after its checksum (its worker in the engine
    core, as the suite's other servers: tests/vllm_layout.py) and a tier of a tensor-parallel engine (two ranks: a
    worker process each, whatever the switch). Spawned once the session's first start-ups are over (early.py), else by
    the fixture."""
    tier = ["--kvsched-fp8-tier-gb", "0.05"]
    admin = {"KVSCHED_ADMIN_KEYS": "tier-admin"}
    return {
        "tier": ServerSpec(model=model, scheduler="kvsched", max_model_len=FP8_MAX_LEN, num_blocks=FP8_POOL_BLOCKS,
                           extra_args=tier, env=admin, worker=DEFAULT_LAYOUT),
        "faulty": ServerSpec(model=model, scheduler="kvsched", max_model_len=FP8_MAX_LEN, num_blocks=FP8_POOL_BLOCKS,
                             env={"KVSCHED_TIER_FAULT_EVERY": "1"}, extra_args=tier, worker=worker()),
        "tp": ServerSpec(model=model, scheduler="kvsched", max_model_len=1024, num_blocks=FP8_POOL_BLOCKS, env=admin,
                         extra_args=["--kvsched-fp8-tier-gb", str(FP8_TP_TIER_GIB), "--tensor-parallel-size", "2"],
                         worker=DEFAULT_LAYOUT)}


PLAN_BLOCK = 32


def plan_kv_spec(model_dir: Path, kv_gib: int, extra_args: list[str]) -> ServerSpec:
    """test_plan_vllm's stock vLLM sizing its KV pool from `kv_gib` (VLLM_CPU_KVCACHE_SPACE), its log at INFO."""
    return ServerSpec(model=model_dir, scheduler=None, max_model_len=512, block_size=PLAN_BLOCK, kv_cache_gib=kv_gib,
                      env={"VLLM_LOGGING_LEVEL": "INFO", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)},
                      dtype="bfloat16", extra_args=extra_args, worker=worker())


def config_only_llama(tiny_model_dir: Path, out: Path) -> Path:
    """A Llama shape vLLM has never seen, with no weights (`--load-format dummy` fills them)."""
    import json
    import shutil

    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=6,
               intermediate_size=2048)
    cfg.pop("head_dim", None)  # derived: hidden / heads = 64
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def plan_specs(tiny_model_dir: Path, out: Path) -> tuple[dict[str, ServerSpec], str]:
    """test_plan_vllm's own engine (the config-only Llama written to `out`, 2 GiB of FP8 KV cache where the CPU backend
    supports one, else bf16) by name, and that KV dtype. Spawned when test_fp8_tier's servers are stopped (early.py),
    else by its fixture."""
    kv_dtype = "fp8" if cpu_features().fp8_kv_cache else "bf16"
    extra = ["--load-format", "dummy", "--kv-cache-dtype", "fp8"] if kv_dtype == "fp8" else ["--load-format", "dummy"]
    return {"config-only": plan_kv_spec(config_only_llama(tiny_model_dir, out), 2, extra)}, kv_dtype


SERVE_KEY = "test-key"


def serve_spec(model: Path) -> ServerSpec:
    """test_serve's kvsched server (its own: its tests count the pool's blocks and end every session they see), at
    INFO (its tier's start-up line is checked). conftest.serve_launched spawns it while test_plan_vllm's engine starts
    (one start-up alone keeps one core busy: three single-threaded imports one after another)."""
    return ServerSpec(model=model, scheduler="kvsched", max_model_len=1024, num_blocks=48, api_key=SERVE_KEY,
                      env={"VLLM_LOGGING_LEVEL": "INFO"}, worker=worker())


# `vllm serve` commands that must fail at start (each imports vLLM first, ~15 CPU-seconds): run at once the first time
# a module asks for one (conftest.failed_starts), so that 2 cores run two at a time; module -> name -> (argv, env).
# One real command per failure path: the bad tier sizes all stop at the flag's parse (compat/tier_args._TierAction),
# so one of them runs as `vllm serve`, and every one of them through the same parser in-process
# (tests/adapters/vllm/test_compat.py, no process of its own).
BAD_TIER_SIZES = [("-1", "finite number of GiB >= 0"), ("lots", "must be a number of GiB"),
                  ("1000000", "exceeds this machine's host memory")]
SERVED_BAD_TIER_SIZE = BAD_TIER_SIZES[2]  # the check that reads this host's memory: the real command's


def failing_starts(model: Path) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    """`env` None: this process's environment; else the whole environment of the command."""
    import os

    from kvsched.serving import vllm_command

    serve = [*vllm_command(), "serve", str(model)]
    malformed = dict(os.environ, KVSCHED_INFER_SESSIONS="maybe", KVSCHED_COMPACTION_CLIENT_STRATEGIES="shrink",
                     KVSCHED_CPU_ISA="sse9", KVSCHED_STORE_KV_TTL_S="-1",
                     KVSCHED_BODY_TIMEOUT_S="0")
    starts: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "serve:malformed": ([*serve, "--scheduler", "kvsched"], malformed),  # test_serve
        "serve:unknown": ([*serve, "--scheduler", "nonsense"], None),
        "tier:bad": ([*serve, "--scheduler", "kvsched", "--kvsched-fp8-tier-gb", SERVED_BAD_TIER_SIZE[0]],
                     None)}  # test_fp8_tier
    if cpu_features().fp8_kv_cache_refusal():  # test_fp8_kv, on a CPU that cannot hold an fp8 KV cache
        starts["fp8_kv:refused"] = ([*serve, "--scheduler", "kvsched", "--kv-cache-dtype", "fp8"], None)
    return starts
