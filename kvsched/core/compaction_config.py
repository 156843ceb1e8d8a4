"""Configuration of context compaction (one frozen dataclass, read from `KVSCHED_COMPACTION*` environment variables).

Environment variables are how kvsched settings reach vLLM's processes: the plugin cannot add flags to the API server
without owning its parser, and `vllm serve` passes its environment to every process it starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

from kvsched.core.env import env_setting

DEFAULT_SUMMARY_PROMPT = (
    "Summarize the conversation above for your own later use. Keep every fact, decision, name, number and open task "
    "that later turns may need; drop chatter. Write at most {target_tokens} tokens."
)
DEFAULT_SUMMARY_PREFIX = "Summary of the earlier conversation (written by kvsched compaction):\n"


class Strategy(StrEnum):
    """What kvsched does when a session's context grows (the sizing guide's three context strategies, and off)."""

    SUMMARIZE = "summarize"  # older turns -> one summary (one extra inference call per checkpoint)
    SLIDING_WINDOW = "sliding_window"  # older turns dropped, system prompt kept
    CAP = "cap"  # refuse past a context cap (HTTP 4xx)
    OFF = "off"


class InvalidCompactionInput(ValueError):
    """A request or the environment named an unknown strategy or a malformed compaction setting (HTTP 400)."""


def parse_strategy(raw: object) -> Strategy:
    try:
        return Strategy(str(raw).strip().lower())
    except ValueError:
        raise InvalidCompactionInput(
            f"unknown compaction strategy {raw!r}; choose one of: {', '.join(s.value for s in Strategy)}") from None


@dataclass(frozen=True, slots=True)
class CompactionConfig:
    """How kvsched keeps long sessions' contexts bounded (server-wide; a request can pick another strategy).

    strategy: the server default (`KVSCHED_COMPACTION`); `off` unless set.
    trigger_tokens: compact when the part of a session's context older than its `keep_recent_messages` newest
        messages (system prompt and an earlier summary excluded: the turns since the last cut) reaches this many
        tokens. 5,000 by default, as in the sizing guide ("every 5K tokens of older context into a 500-token
        summary"). Must exceed summary_target_tokens when `summarize` may run. Whatever it says, a served prompt that
        reaches 3/4 of the model's context is compacted (`compaction.CONTEXT_SHARE`) if more than a summary's worth
        of turns can be replaced.
    keep_recent_messages: newest messages always kept verbatim (the cut then moves back to where a turn group starts:
        a user message, or an assistant message whose predecessor's tool calls all have their results).
    summary_target_tokens: max_tokens of the summarization call (~500 in the sizing guide).
    summary_prompt: the instruction appended to the conversation for the summarization call; `{target_tokens}` is
        filled in.
    summary_prefix: the text that introduces the summary in the rewritten conversation.
    summary_role: where the summary goes (`kvsched/core/compaction_layout.py`): `system` (the default) appends it to
        the leading system message when there is one and the kept turns start with a user message, else it becomes a
        user message; `user` always makes it a user message. A summary in a user message before a kept user message is
        followed by a one-word assistant acknowledgement, so roles keep alternating: the templates of Mistral v0.x,
        Llama 2, Gemma and Phi-3 refuse anything else (found by review: a separate summary message, whatever its
        role, made vLLM answer HTTP 400 to every later turn). `assistant` is no longer accepted: an assistant message
        right after the system prompt breaks those templates.
    summary_timeout_s: a summary call slower than this is abandoned (counted; the request is served uncompacted).
    summary_priority: vLLM request priority of the summary call (higher = later). It only has an effect when the
        server runs `--scheduling-policy priority`; under the default FCFS policy vLLM ignores it.
    wait_for_summary: the request that triggers a summary waits for it (bounded by the timeout) and is served
        compacted; by default it is served at once on its uncompacted (cached) prefix while the summary is made in
        the background, and the next request of the session uses it.
    retry_after_s: after a failed summary call, a session is not summarised again for this long; after a summary that
        no later request used (its client edits old messages), as long, doubled for each such summary in a row.
    cap_tokens: the `cap` strategy refuses requests whose context exceeds this many tokens.
    message_overhead_tokens: template tokens counted per message on top of its content (role markers, separators).
    max_sessions / checkpoints_per_session: bounds on the summary store (least recently used sessions go first;
        checkpoints per conversation under an id, for up to 16 conversations: a `user:` id holds all of a user's chats).
    image_tokens / audio_tokens / video_tokens: the tokens counted for one image, audio or video part of a message
        (`image_url`, `input_image`, `image_embeds`, `image_pil`; `input_audio`, `audio_url`, `audio_embeds`;
        `video_url`, `video_embeds`), since the API server cannot see what the model's processor makes of it. The
        defaults are middling: an image is 256 tokens on Gemma 3, 576 on LLaVA-1.5 and about 1,300 for a 1024x1024
        picture on Qwen2-VL; 30 s of audio 750 on Qwen2-Audio; a video several thousand. Any other part that is not
        text (e.g. `file`) counts as an image. Found by review: every such part counted 0, so a session of pictures
        never triggered and its summary calls went past the context.
    client_strategies: the strategies a request may select with `X-KVSched-Compaction` / `vllm_xargs.compaction`
        (`KVSCHED_COMPACTION_CLIENT_STRATEGIES=summarize,cap`). Empty (the default): only the server's own strategy.
        `off` is always allowed (a client may always opt out); anything else is refused with HTTP 403, because a
        summary is an extra inference call and a window or cap changes what the model sees: the operator decides.
    """

    strategy: Strategy = Strategy.OFF
    trigger_tokens: int = 5000
    keep_recent_messages: int = 4
    summary_target_tokens: int = 500
    summary_prompt: str = DEFAULT_SUMMARY_PROMPT
    summary_prefix: str = DEFAULT_SUMMARY_PREFIX
    summary_role: str = "system"
    summary_timeout_s: float = 120.0
    summary_priority: int = 10
    wait_for_summary: bool = False
    retry_after_s: float = 30.0
    cap_tokens: int = 8192
    message_overhead_tokens: int = 4
    max_sessions: int = 10_000
    checkpoints_per_session: int = 4
    image_tokens: int = 1024
    audio_tokens: int = 750
    video_tokens: int = 4096
    client_strategies: tuple[Strategy, ...] = ()

    def __post_init__(self) -> None:
        for name in ("trigger_tokens", "summary_target_tokens", "cap_tokens", "max_sessions",
                     "checkpoints_per_session"):
            if getattr(self, name) < 1:
                raise InvalidCompactionInput(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.summarizes and self.trigger_tokens <= self.summary_target_tokens:  # review: each turn re-summarised
            raise InvalidCompactionInput(
                f"trigger_tokens ({self.trigger_tokens}, KVSCHED_COMPACTION_TRIGGER_TOKENS) must be larger than "
                f"summary_target_tokens ({self.summary_target_tokens}, KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS): a "
                f"summary would be as large as the turns it replaces")
        if self.keep_recent_messages < 1:
            raise InvalidCompactionInput("keep_recent_messages must be >= 1 (the newest message is always kept)")
        for name in ("message_overhead_tokens", "image_tokens", "audio_tokens", "video_tokens"):
            if getattr(self, name) < 0:
                raise InvalidCompactionInput(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.summary_timeout_s) and self.summary_timeout_s > 0):
            raise InvalidCompactionInput(f"summary_timeout_s must be a finite number > 0, got {self.summary_timeout_s}")
        if not (math.isfinite(self.retry_after_s) and self.retry_after_s >= 0):
            raise InvalidCompactionInput(f"retry_after_s must be a finite number >= 0, got {self.retry_after_s}")
        if not self.summary_prompt.strip():  # found by review: "" was taken, and every summary call had no instruction
            raise InvalidCompactionInput("summary_prompt must not be empty: it is the summary call's instruction")
        if self.summary_role not in ("system", "user"):
            raise InvalidCompactionInput(
                f"summary_role must be system or user, got {self.summary_role!r} (an assistant message right after "
                f"the system prompt breaks chat templates that require alternating user/assistant roles)")

    @property
    def summarizes(self) -> bool:
        """Whether summary calls may run: `summarize` is the server's strategy or one a client may pick."""
        return self.strategy is Strategy.SUMMARIZE or Strategy.SUMMARIZE in self.client_strategies

    def client_may_select(self, strategy: Strategy) -> bool:
        """May a request pick `strategy`? Opting out always; otherwise one the operator enabled."""
        return strategy is Strategy.OFF or strategy is self.strategy or strategy in self.client_strategies

    def client_choices(self) -> list[str]:
        allowed = {Strategy.OFF, self.strategy, *self.client_strategies}
        return [s.value for s in Strategy if s in allowed]

    def instruction(self) -> str:
        return self.summary_prompt.replace("{target_tokens}", str(self.summary_target_tokens))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> CompactionConfig:
        """`KVSCHED_COMPACTION` = strategy; every other field is `KVSCHED_COMPACTION_<FIELD>` (e.g.
        KVSCHED_COMPACTION_TRIGGER_TOKENS=5000, KVSCHED_COMPACTION_WAIT_FOR_SUMMARY=1)."""
        env = os.environ if environ is None else environ
        updates: dict[str, Any] = {}
        if (raw := env_setting(env, "KVSCHED_COMPACTION")) is not None:
            try:
                updates["strategy"] = parse_strategy(raw)
            except InvalidCompactionInput as exc:
                raise InvalidCompactionInput(f"KVSCHED_COMPACTION={raw!r}: {exc}") from None
        for f in fields(cls):
            if f.name == "strategy":
                continue
            var = f"KVSCHED_COMPACTION_{f.name.upper()}"
            # Blank means unset, but for the prefix an empty text is a setting: the summary with nothing before it.
            raw = env.get(var) if f.name == "summary_prefix" else env_setting(env, var)
            if raw is None:
                continue
            default = getattr(cls(), f.name)
            try:
                if f.name == "client_strategies":
                    updates[f.name] = tuple(parse_strategy(p) for p in raw.split(",") if p.strip())
                elif isinstance(default, bool):
                    updates[f.name] = parse_bool(raw)
                elif isinstance(default, int):
                    updates[f.name] = int(raw)
                elif isinstance(default, float):
                    updates[f.name] = float(raw)
                else:
                    updates[f.name] = raw
            except InvalidCompactionInput as exc:
                raise InvalidCompactionInput(f"{var}={raw!r}: {exc}") from None
            except ValueError:
                raise InvalidCompactionInput(f"{var}={raw!r} is not a valid {type(default).__name__}") from None
        try:
            return replace(cls(), **updates)
        except InvalidCompactionInput as exc:  # a value out of range: name the variable that set it
            names = [n for n in updates if str(exc).startswith(n)]
            var = f"KVSCHED_COMPACTION_{names[0].upper()}" if names else "KVSCHED_COMPACTION_*"
            raise InvalidCompactionInput(f"{var}: {exc}") from None


def parse_bool(raw: str) -> bool:
    """A KVSCHED_* boolean: 1/true/yes/on or 0/false/no/off (or empty); anything else raises ValueError."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/true/yes/on or 0/false/no/off, got {raw!r}")
