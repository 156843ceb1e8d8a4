"""Deterministic random-weight Llama models and a locally trained byte-level BPE tokenizer.

Tests, the demo and the benchmarks never touch a model hub: they build a Llama-architecture model directory here
(config.json, model.safetensors, tokenizer.json with a chat template) from a fixed seed and cache it on disk. The
weights are random, so outputs are noise; the engine's compute and memory paths are exercised exactly as with a real
Llama of that shape.

The dtype defaults to the one this CPU computes fastest (bfloat16 with native bf16, float32 without: there vLLM's CPU
kernels emulate bf16 and prefill many times slower). The float32 model holds the bf16 model's weights exactly, so the
two are the same model at two precisions. Serve a float32 model with `--dtype float32`: vLLM's `--dtype auto`
downcasts float32 checkpoints to bfloat16 (`ServerSpec` passes the model's dtype for you).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from kvsched.core.env import env_setting

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
FORMAT_VERSION = 1  # bump when the files written here change
DTYPES = ("bfloat16", "float32")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Shape of a Llama model; head_dim = hidden_size / num_attention_heads (64: the CPU kernels reject 16)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int = 2048
    max_position_embeddings: int = 16384

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """KV bytes per token in `dtype` (K and V, every layer; the KV cache takes the model's dtype)."""
        element = {"bfloat16": 2, "float16": 2, "float32": 4}[dtype]
        return element * 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        return 2 * self.vocab_size * h + self.num_hidden_layers * per_layer + h


SIZES: dict[str, ModelShape] = {
    # ~2.2M parameters: fast engine starts for tests and the demo.
    "test": ModelShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2),
    # ~50M parameters: prefill dominates per-request overhead on a CPU, as an 8B model's does on a GPU.
    "bench": ModelShape(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                        num_key_value_heads=4),
}


def default_cache_dir() -> Path:
    root = env_setting(os.environ, "KVSCHED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kvsched")
    return Path(root) / "models"


def spec_digest(shape: ModelShape, seed: int, dtype: str = "bfloat16") -> str:
    fields: dict[str, object] = {"shape": asdict(shape), "seed": seed, "format": FORMAT_VERSION}
    if dtype != "bfloat16":  # bf16 models keep the digest (and cache directory) they had before dtypes existed
        fields["dtype"] = dtype
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def resolve_dtype(dtype: str | None) -> str:
    """`dtype`, checked, or (None / "auto") the one this CPU computes fastest."""
    if dtype is None or dtype == "auto":
        from kvsched.ops.cpu_features import cpu_features

        return cpu_features().fastest_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"unknown tiny-model dtype {dtype!r}; choose auto or one of {list(DTYPES)}")
    return dtype


def ensure_tiny_model(size: str = "test", cache_dir: Path | None = None, seed: int = 0,
                      dtype: str | None = None) -> Path:
    """Return the cached model directory for `size` in `dtype` (default: this CPU's fastest), building it on first
    use."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny-model size {size!r}; choose one of {sorted(SIZES)}")
    shape, dtype = SIZES[size], resolve_dtype(dtype)
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"
    out = (cache_dir or default_cache_dir()) / f"llama-{size}{suffix}-{spec_digest(shape, seed, dtype)}"
    return build_model(out, shape, seed, dtype)


def tiny_model_dtype(model_dir: Path) -> str | None:
    """The dtype a tiny model directory was built in (models built before dtypes existed are bfloat16), or None when
    `model_dir` is not a tiny model."""
    try:
        stamp = json.loads((Path(model_dir) / "kvsched-tiny-model.json").read_text())
    except (OSError, ValueError):
        return None
    return str(stamp.get("dtype", "bfloat16"))


def build_model(out: Path, shape: ModelShape, seed: int = 0, dtype: str | None = None) -> Path:
    """Write a model directory at `out` (atomically); a complete one with the same spec is reused."""
    dtype = resolve_dtype(dtype)
    stamp = out / "kvsched-tiny-model.json"
    digest = spec_digest(shape, seed, dtype)
    if stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _write_tokenizer(tmp, shape.vocab_size)
        _write_config(tmp, shape, dtype)
        _write_weights(tmp, shape, seed, dtype)
        (tmp / "kvsched-tiny-model.json").write_text(json.dumps(
            {"digest": digest, "seed": seed, "dtype": dtype, "shape": asdict(shape),
             "parameters": shape.num_parameters()}, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _corpus(n_lines: int = 4000, seed: int = 1234) -> list[str]:
    """A deterministic English-like corpus for BPE training: agent/tool vocabulary plus digits and punctuation."""
    words = (
        "the of and to in is that for it as with was on be by this are or from at an which but not have has had "
        "agent tool call result session turn context memory cache block token prefix model server request response "
        "orchestrator worker planner researcher summary search page document file query answer plan step task user "
        "system assistant function json value error retry latency budget time seconds score eviction retention "
        "read write open close list find compute return status ok done next first last data report table chart "
        "python code test run build install config option path key id name type number string true false null"
    ).split()
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        n = rng.randint(5, 25)
        parts = []
        for _ in range(n):
            r = rng.random()
            if r < 0.08:
                parts.append(str(rng.randint(0, 100000)))
            elif r < 0.12:
                parts.append(rng.choice(['{"id":', '"result":', "},", "[", "]", "():", "->", "==", "#"]))
            else:
                w = rng.choice(words)
                parts.append(w.capitalize() if rng.random() < 0.1 else w)
        lines.append(" ".join(parts) + rng.choice([".", "!", "?", ":", ";", ""]))
    return lines


def _write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000, "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}, indent=2))


def _write_config(out: Path, shape: ModelShape, dtype: str) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}, indent=2))


def _write_weights(out: Path, shape: ModelShape, seed: int, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    target = getattr(torch, dtype)
    h, i, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    kv = shape.num_key_value_heads * hd

    def w(rows: int, cols: int) -> torch.Tensor:
        # rounded to bf16 first, so the float32 model holds exactly the bf16 model's weights
        return (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16).to(target)

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(shape.vocab_size, h)}
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        tensors[p + "self_attn.q_proj.weight"] = w(h, h)
        tensors[p + "self_attn.k_proj.weight"] = w(kv, h)
        tensors[p + "self_attn.v_proj.weight"] = w(kv, h)
        tensors[p + "self_attn.o_proj.weight"] = w(h, h)
        tensors[p + "mlp.gate_proj.weight"] = w(i, h)
        tensors[p + "mlp.up_proj.weight"] = w(i, h)
        tensors[p + "mlp.down_proj.weight"] = w(h, i)
        tensors[p + "input_layernorm.weight"] = torch.ones(h, dtype=target)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=target)
    tensors["model.norm.weight"] = torch.ones(h, dtype=target)
    tensors["lm_head.weight"] = w(shape.vocab_size, h)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
