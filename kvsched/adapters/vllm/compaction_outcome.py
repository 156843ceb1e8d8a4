"""What the compaction middleware does with one request (`Outcome`), and what it learns from vLLM's answer to a
rewritten one: the `X-KVSched-Compacted` header on success, and a refusal that the rewrite itself may have caused.

Found by review: a chat template that did not accept the rewrite made vLLM answer HTTP 400, and since the checkpoint
stayed, every later turn of the session failed as well. An error answer to a rewritten request that is not about the
request's length or one of its parameters (`rewrite_refused`) is now held back from the client, reported
(`Outcome.refused`), and the request is sent again once, as the client sent it (`Outcome.original`): the client gets
that answer, success or the original's own error, never a failure caused by kvsched (found by review: the refused
request itself still failed). That answer is the probe (`Outcome.probed`): taken, the rewrite was the cause and the
conversation is served as sent from then on; refused too, the client's request was, and compaction goes on.

Only an error answer is held back, and vLLM sends one before any response header: a chat template's or a length
check's refusal comes before the engine sees the request, also for `stream: true` (a JSON error, no event stream).
A response that has started (200, an event stream) is never sent again, nor one the engine began to run.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kvsched.adapters.vllm.http_io import replace_header, replay

COMPACTED_HEADER = b"x-kvsched-compacted"
REFUSAL_STATUSES = (400, 422)  # vLLM's answers to a request it cannot render (a chat template's exception: 400)
MAX_ERROR_BODY = 65_536  # bytes of an error answer read (and held back) to tell a template's refusal from others

Send = Callable[[dict[str, Any]], Awaitable[None]]


def rewrite_refused(status: int, body: bytes) -> bool:
    """Might this error answer to a rewritten request be the rewrite's fault? A 400/422 whose error names no parameter
    other than `messages` and is not vLLM's context-length error: a chat template's exception is answered so
    (vllm/entrypoints/serve/exception_handling/error_response.py), while a bad sampling parameter names it and a
    prompt past the context would be longer still uncompacted."""
    if status not in REFUSAL_STATUSES:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return True
    error = data.get("error", data) if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return True
    message = str(error.get("message", ""))
    return error.get("param") in (None, "messages") and "maximum context length" not in message


class HeldAnswer:
    """vLLM's answer to a rewritten request on its way to the client: a success gets `X-KVSched-Compacted` (an error
    never does: found by review, a request vLLM refused was reported as served compacted); a 400/422 is held back
    until read whole, then, if the rewrite may have caused it (`refused_status` says so), dropped when the request
    is to be sent again (`resend`), else sent on. A body past MAX_ERROR_BODY is sent on as it comes."""

    def __init__(self, send: Send, replaced: int, resend: bool) -> None:
        self.send = send
        self.value = str(replaced).encode()
        self.resend = resend
        self.held: list[dict[str, Any]] | None = None
        self.status = 0
        self.size = 0
        self.refused_status: int | None = None

    async def __call__(self, message: dict[str, Any]) -> None:
        if self.held is not None:
            self.held.append(message)
            if message["type"] == "http.response.body":
                self.size += len(message.get("body", b""))
                if self.size > MAX_ERROR_BODY:
                    await self.flush()
                elif not message.get("more_body", False):
                    body = b"".join(m.get("body", b"") for m in self.held[1:])
                    if rewrite_refused(self.status, body):
                        self.refused_status = self.status
                    if self.refused_status is None or not self.resend:
                        await self.flush()
                    else:
                        self.held = None  # the client gets the answer to the request sent again instead
            return
        if message["type"] == "http.response.start":
            self.status = int(message.get("status", 200))
            if self.status < 400:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != COMPACTED_HEADER]
                message = dict(message, headers=[*headers, (COMPACTED_HEADER, self.value)])
            elif self.status in REFUSAL_STATUSES:
                self.held = [message]
                return
        await self.send(message)

    async def flush(self) -> None:
        """Send on what is held back (an answer that is not a refusal of the rewrite, or one left unfinished)."""
        held, self.held = self.held or [], None
        for message in held:
            await self.send(message)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the middleware does with one request after compaction: forward it (rewritten or not), or refuse it.
    `refused` is called with the answer's status when vLLM refuses a rewritten request (`rewrite_refused`), which is
    then sent again as `original` (the client's messages; kvsched's session fields); `probed` gets the status of the
    answer to a request served as sent to learn whether a refused rewrite was the cause (that one, or a next turn)."""

    changed: bool = False
    replaced: int = 0
    status: int = 200
    error: dict[str, Any] | None = None
    refused: Callable[[int], None] | None = field(default=None, compare=False)
    probed: Callable[[int], None] | None = field(default=None, compare=False)  # a probe's answer status
    original: dict[str, Any] | None = field(default=None, compare=False)

    def wrap(self, send: Send) -> Send:
        """`send` for vLLM's answer: a `HeldAnswer` for a rewritten request; for a probe, one that reports its
        answer's status."""
        if self.replaced:
            return HeldAnswer(send, self.replaced, resend=self.original is not None)
        return send if self.probed is None else _report_status(send, self.probed)

    async def forward(self, app: Any, scope: dict[str, Any], body: bytes, receive: Any, send: Send) -> None:
        """Serve the request (`body`) through `app`. A rewritten one that vLLM refused for what may be the rewrite's
        fault is sent again once as `original`, that answer reported to `probed` and sent to the client."""
        answer = self.wrap(send)
        await app(scope, replay(body, receive), answer)
        if not isinstance(answer, HeldAnswer):
            return
        await answer.flush()
        if answer.refused_status is None:
            return
        if self.refused is not None:
            self.refused(answer.refused_status)
        if self.original is None:
            return
        original = json.dumps(self.original).encode()
        scope = dict(scope, headers=replace_header(scope["headers"], b"content-length", str(len(original)).encode()))
        await app(scope, replay(original, receive), send if self.probed is None else _report_status(send, self.probed))


def _report_status(send: Send, report: Callable[[int], None]) -> Send:
    async def send_reporting(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            report(int(message.get("status", 200)))
        await send(message)

    return send_reporting


UNCHANGED = Outcome()
