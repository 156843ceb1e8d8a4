"""kvsched: session-aware KV-cache scheduling for multi-agent LLM serving, as a vLLM plugin."""

from kvsched import compiled as _compiled

__version__ = "0.1.0"

# Before any kvsched module is imported: use the mypyc build only if it matches every source (kvsched/compiled.py).
_compiled.install()
