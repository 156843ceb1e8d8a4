"""The shapes compaction gives a conversation: where it may be cut, and where the summary goes, so that every chat
template still accepts the result.

Several model families' chat templates (Mistral v0.x, Llama 2, Gemma 2/3, Phi-3) raise unless the roles after an
optional leading system message alternate user/assistant; others (Qwen3) raise when no user message is left. Found by
review: the rewrite `[system, summary, user, ...]` broke the alternating templates for every summary role (vLLM
answered HTTP 400 to every later turn of the session). So:
- a cut is made only where a turn group starts: at a user message, or at an assistant message that neither answers
  the user message right before it nor sits inside an open tool_calls -> tool group (an assistant's tool calls are
  never separated from their results, and an ordinary chat is still cut at its user messages);
- the summary is merged into the last leading system message when the kept part starts with a user message
  (`summary_role` "system", the default); otherwise it is a user message of its own, answered by a one-word assistant
  acknowledgement when the kept part starts with a user message;
- a window (no summary) whose kept part starts with an assistant message is preceded by a user note saying that
  earlier turns were left out.
The summary call's instruction is merged into the last message when that is a user message, and follows an
acknowledgement when that is a tool result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Message = Mapping[str, Any]
SYSTEM_ROLES = ("system", "developer")
SUMMARY_ACK = "Understood."
WINDOW_NOTE = "(Earlier turns of this conversation were left out to fit the context.)"


def leading_system_messages(messages: Sequence[Message]) -> int:
    n = 0
    while n < len(messages) and messages[n].get("role") in SYSTEM_ROLES:
        n += 1
    return n


def turn_starts(messages: Sequence[Message]) -> list[bool]:
    """`out[i]`: may the kept part of a compacted conversation begin at message i? At a user message, or at an
    assistant message that does not answer a user message right before it, once the tool calls of the assistant
    before it have all had their results (the next step of a tool loop)."""
    out: list[bool] = []
    open_calls = 0
    previous: Any = None
    for m in messages:
        role = m.get("role")
        if role == "user":
            open_calls = 0
            out.append(True)
        elif role == "assistant":
            out.append(open_calls == 0 and previous != "user")
            calls = m.get("tool_calls")
            open_calls = len(calls) if isinstance(calls, list) else 0
        else:
            if role == "tool":
                open_calls = max(open_calls - 1, 0)
            out.append(False)
        previous = role
    return out


def with_text(message: Message, text: str) -> dict[str, Any]:
    """A copy of `message` with `text` appended to its content (a text part for list content)."""
    content = message.get("content")
    if isinstance(content, str) and content:
        merged: Any = f"{content}\n\n{text}"
    elif isinstance(content, list):
        merged = [*content, {"type": "text", "text": text}]
    else:
        merged = text
    return {**message, "content": merged}


def place_summary(system: Sequence[Message], summary: str | None, first_kept: Message | None, role: str,
                  dropped: bool = True) -> tuple[list[Message], int, str]:
    """The messages that go before the kept part: the leading system messages and the summary (`summary` is the text
    as served, prefix included; None for a window). Returns (those messages, how many of them kvsched added, the text
    of kvsched's own words among them: an acknowledgement or a note, for the token estimate). `dropped`: whether
    any client message was left out before `first_kept` (a window, or a summary call whose input was cut)."""
    starts_with_user = first_kept is None or first_kept.get("role") == "user"
    head = list(system)
    if summary is None:
        if not dropped or starts_with_user:
            return head, 0, ""
        return [*head, {"role": "user", "content": WINDOW_NOTE}], 1, WINDOW_NOTE
    if starts_with_user and role == "system" and head:
        head[-1] = with_text(head[-1], summary)
        return head, 0, ""
    head.append({"role": "user", "content": summary})
    if starts_with_user:
        return [*head, {"role": "assistant", "content": SUMMARY_ACK}], 2, SUMMARY_ACK
    return head, 1, ""


def with_instruction(prompt: Sequence[Message], instruction: str) -> list[Message]:
    """The summary call's messages: `prompt` and the instruction, as a user message of its own or merged into the
    last message when that is a user message (two user messages in a row break the alternating templates). After a
    tool result an acknowledgement comes first: Mistral's template leaves tool calls and results out of its
    alternation check, so a user message there would follow the user message before the calls."""
    last = prompt[-1] if prompt else None
    if last is not None and last.get("role") == "user":
        return [*prompt[:-1], with_text(last, instruction)]
    ask = {"role": "user", "content": instruction}
    if last is not None and (last.get("role") == "tool" or last.get("tool_calls")):
        return [*prompt, {"role": "assistant", "content": SUMMARY_ACK}, ask]
    return [*prompt, ask]


def filler_tokens(text: str) -> int:
    """Estimated tokens of kvsched's own short words (about 4 characters a token)."""
    return (len(text) + 3) // 4
