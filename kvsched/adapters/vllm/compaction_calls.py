"""The summarization call: an in-process POST to vLLM's own /v1/chat/completions (below kvsched's middleware), and
what is taken from its answer.

The call is rendered like the session's own requests (the request's `chat_template` and `chat_template_kwargs` go
along, so e.g. `enable_thinking: false` holds for it too and its prompt stays the session's cached prefix), and its
answer is cleaned of a reasoning model's `<think>...</think>` block. Found by review: the call passed no template
arguments and a reasoning model's thoughts were stored as the summary.

A tool-using session's `tools` go along too, with `tool_choice: "none"`: the template renders the tool definitions
and the tool-call messages as for the session's own requests (templates that render tool calls only against their
tools, or refuse them without, took the call as malformed; and the definitions usually open the prompt, so without
them the call missed the session's cached prefix from its first block), while the model answers in text, which needs
no tool parser on the server. Found by review: the call carried no tools. A server run with
`--exclude-tools-when-tool-choice-none` leaves them out of the render by the operator's choice.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvsched.adapters.vllm import compat
from kvsched.core.compaction import SummaryJob
from kvsched.core.compaction_config import CompactionConfig

CHAT_PATH = "/v1/chat/completions"
TEMPLATE_FIELDS = ("chat_template", "chat_template_kwargs")  # how the session's requests are rendered


class SummaryCallFailed(RuntimeError):
    """The summarization request was answered with an error."""


@dataclass(frozen=True, slots=True)
class SummaryReply:
    text: str  # the answer, any reasoning block removed
    truncated: bool  # the model stopped at max_tokens (finish_reason "length")


def strip_reasoning(text: str) -> str:
    """`text` without a reasoning model's leading `<think>...</think>` block (also when the template opened it, so
    the answer starts inside it); "" when the answer is all reasoning, cut off before its end."""
    _, closed, after = text.partition("</think>")
    if closed:
        return after
    return "" if text.lstrip().startswith("<think>") else text


def summary_body(job: SummaryJob, payload: Mapping[str, Any], config: CompactionConfig,
                 infer_flag: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": payload.get("model"), "messages": list(job.prompt), "stream": False, "temperature": 0.0,
        "max_tokens": config.summary_target_tokens, "priority": config.summary_priority,
        "vllm_xargs": {infer_flag: 0},  # not a session turn: never pinned, never an inferred session
    }
    for name in ("cache_salt", *TEMPLATE_FIELDS):
        if payload.get(name) is not None:
            body[name] = payload[name]
    if payload.get("tools"):  # rendered like the session's requests; answered in text, never with a tool call
        body["tools"], body["tool_choice"] = payload["tools"], "none"
    return body


async def summary_call(app: Any, scope: Mapping[str, Any], job: SummaryJob, payload: Mapping[str, Any],
                       config: CompactionConfig, extra_headers: list[tuple[bytes, bytes]]) -> SummaryReply:
    body = summary_body(job, payload, config, compat.XARG_INFER)
    status, data = await call_asgi(app, scope, CHAT_PATH, json.dumps(body).encode(),
                                   auth_headers(scope) + extra_headers)
    if status != 200:
        raise SummaryCallFailed(f"HTTP {status}: {data[:300].decode(errors='replace')}")
    choice = json.loads(data)["choices"][0]
    text = str(choice["message"].get("content") or "")
    return SummaryReply(strip_reasoning(text), choice.get("finish_reason") == "length")


def auth_headers(scope: Mapping[str, Any]) -> list[tuple[bytes, bytes]]:
    """The server's own API key, for the in-process call (vLLM's auth middleware sits below kvsched's)."""
    keys = compat.api_keys(scope["app"]) if "app" in scope else []
    return [(b"authorization", f"Bearer {keys[0]}".encode())] if keys else []


async def call_asgi(app: Any, template: Mapping[str, Any], path: str, body: bytes,
                    headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """POST `body` (JSON) to `path` of an ASGI app in-process, through httpx's ASGI transport; returns (status,
    response body). The call carries the calling request's lifespan state (`scope["state"]`), root path and
    application object (`scope["app"]`, which vLLM's handlers read and the stack below the middleware does not set)."""
    import httpx

    state, outer = template.get("state"), template.get("app")

    async def with_state(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if state is not None:
            scope["state"] = dict(state)
        if outer is not None:  # `app` is the stack below kvsched's middleware: vLLM's handlers read the FastAPI app
            scope["app"] = outer
        await app(scope, receive, send)

    transport = httpx.ASGITransport(app=with_state, root_path=template.get("root_path", ""))
    async with httpx.AsyncClient(transport=transport, base_url="http://kvsched.local", timeout=None) as client:
        reply = await client.post(path, content=body, headers=[
            ("content-type", "application/json"), *((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)])
    return reply.status_code, reply.content
