"""Token counts of a chat request's messages for the compaction core, with the tokenizer vLLM serves with.

Counting runs in the API server's event loop's request path, before vLLM's own length check, so it must never stall
the loop (found by review: a 20 MB message tokenized on the loop stalled every request of the server, /health too, for
half a minute). Counts are cached per message; new text past a few thousand characters is tokenized in a worker
thread; a request with a message larger than the model's context could hold at the tokenizer's longest token per
token is not tokenized at all. vLLM refuses such a
message as too long, and did when it was the newest (the newest turns are always served as sent), so no conversation
that was served goes on past it. The whole request is not bounded so: a client sends its whole history every turn,
which compaction lets grow far past the context.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.core.compaction import Message, message_digest

Tokenizer = Callable[[str], int]
TEXT_KEYS = ("text", "thinking", "refusal")  # a content part's text, by vLLM's part types (renderers/chat_utils.py)
IMAGE_PARTS = ("image_url", "input_image", "image_embeds", "image_pil")
AUDIO_PARTS = ("input_audio", "audio_url", "audio_embeds")
VIDEO_PARTS = ("video_url", "video_embeds")
TEXT_PARTS = ("text", "input_text", "output_text", "thinking", "refusal", "tool_reference")
TOKEN_CACHE_ENTRIES = 65_536
TOKENIZE_THREADS = 2
INLINE_TOKENIZE_CHARS = 16_384  # new text a request may tokenize on the event loop (a few ms); more goes to a thread
FALLBACK_CHARS_PER_TOKEN = 32  # when the tokenizer's vocabulary cannot be read: a message with more characters than
# this per token of the model's context is past the context (tokenizers average about 4 characters per token)


class TokenCounter:
    """One per API server: the served tokenizer and context length (read on first use) and the counts' cache."""

    def __init__(self, tokenizer: Tokenizer | None = None, media: MediaCosts | None = None) -> None:
        self._tokenizer = tokenizer
        self.media = media or MediaCosts()
        self._max_model_len: int | None = None  # of the served model (0: unknown)
        self._chars_per_token: int | None = None  # the tokenizer's longest token (`chars_per_token`)
        # Threads of their own: in the default executor, a few requests of large messages could hold every worker and
        # delay the shared store's checkpoint loads and saves, which run there too (found by review).
        self._pool = ThreadPoolExecutor(max_workers=TOKENIZE_THREADS, thread_name_prefix="kvsched-tokens")
        self._cache: OrderedDict[bytes, int] = OrderedDict()  # message digest -> tokens, least recently used first

    async def counts(self, messages: Sequence[Message], scope: Mapping[str, Any]) -> list[int]:
        """Tokens of each message's content, tool calls, name and tool call id, and its media parts at their
        configured cost (template markers are added by the core)."""
        digests = [message_digest(m) for m in messages]
        counts = {d: n for d in digests if (n := self._cache.get(d)) is not None}
        new = {d: message_text(m) for d, m in zip(digests, messages, strict=True) if d not in counts}
        if new:
            tokenize = self._tokenize(scope)

            media = {d: self.media.of(m) for d, m in zip(digests, messages, strict=True) if d in new}

            def count() -> dict[bytes, int]:
                return {d: tokenize(text) + media[d] for d, text in new.items()}

            inline = sum(len(text) for text in new.values()) <= INLINE_TOKENIZE_CHARS
            counts.update(count() if inline else await asyncio.get_running_loop().run_in_executor(self._pool, count))
        for d in digests:
            self._cache[d] = counts[d]
            self._cache.move_to_end(d)
        while len(self._cache) > TOKEN_CACHE_ENTRIES:
            self._cache.popitem(last=False)
        return [counts[d] for d in digests]

    def oversized(self, messages: Sequence[Message], scope: Mapping[str, Any]) -> bool:
        """A message holds more text than the model's whole context could, even at the tokenizer's longest token per
        token (never if the context is unknown): no such message can be served, so counting it is wasted work."""
        limit = self.chars_per_token(scope) * self.context_tokens(scope)
        return bool(limit) and any(len(message_text(m)) > limit for m in messages)

    def chars_per_token(self, scope: Mapping[str, Any]) -> int:
        """Most characters one token can stand for: the longest entry of the served tokenizer's vocabulary (byte-level
        symbols are one byte, at least one character, each). Found by review: a fixed 8 refused messages of long
        tokens (runs of spaces, `=` or `-`) that fit the context."""
        if self._chars_per_token is None:
            try:
                vocab = served_tokenizer(scope["app"]).get_vocab()
                self._chars_per_token = max(map(len, vocab), default=0) or FALLBACK_CHARS_PER_TOKEN
            except Exception:  # noqa: BLE001 - no tokenizer or vocabulary to read: the fallback bound
                self._chars_per_token = FALLBACK_CHARS_PER_TOKEN
        return self._chars_per_token

    def context_tokens(self, scope: Mapping[str, Any]) -> int:
        """The served model's context (vLLM's max_model_len); 0 if the server does not say."""
        if self._max_model_len is None:
            self._max_model_len = compat.served_context_tokens(scope["app"]) if "app" in scope else 0
        return self._max_model_len

    def _tokenize(self, scope: Mapping[str, Any]) -> Tokenizer:
        if self._tokenizer is None:
            tok = served_tokenizer(scope["app"])
            self._tokenizer = lambda text: len(tok.encode(text, add_special_tokens=False))
        return self._tokenizer


def served_tokenizer(app: Any) -> Any:
    """The tokenizer vLLM's API server serves with (`AsyncLLM.get_tokenizer()`, vLLM 0.32)."""
    return app.state.engine_client.get_tokenizer()


class MediaCosts:
    """Tokens counted per image, audio and video part (`CompactionConfig.image_tokens` ...); any other part that is
    not text counts as an image."""

    def __init__(self, image: int = 1024, audio: int = 750, video: int = 4096) -> None:
        self.image, self.audio, self.video = image, audio, video

    def of(self, message: Message) -> int:
        content = message.get("content")
        if not isinstance(content, list):
            return 0
        total = 0
        for part in content:
            if not isinstance(part, dict):
                continue  # not a content part: vLLM refuses it
            kind = part.get("type")
            if kind in TEXT_PARTS or (kind is None and "text" in part):
                continue
            total += self.audio if kind in AUDIO_PARTS else self.video if kind in VIDEO_PARTS else self.image
        return total


def message_text(message: Message) -> str:
    """The text of a message that its template renders: its content's text (of text parts, for list content), its
    tool calls, and its name and tool call id. Found by review: the last three counted nothing."""
    content = message.get("content")
    if isinstance(content, list):
        text = "\n".join(str(p.get(k)) for p in content if isinstance(p, dict) for k in TEXT_KEYS
                         if p.get(k) is not None)
    else:
        text = "" if content is None else str(content)
    if message.get("tool_calls"):
        text += json.dumps(message["tool_calls"], default=str)
    extras = [str(message[k]) for k in ("name", "tool_call_id") if message.get(k) is not None]
    return " ".join([text, *extras]) if extras else text
