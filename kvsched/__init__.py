"""kvsched: session-aware KV-cache scheduling for multi-agent LLM serving, as a vLLM plugin."""

__version__ = "0.1.0"
