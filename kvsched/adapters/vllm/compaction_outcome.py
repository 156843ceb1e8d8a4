"""What the compaction middleware does with one request (`Outcome`), and what it learns from vLLM's answer to a
rewritten one: the `X-KVSched-Compacted` header on success, and a refusal that the rewrite itself may have caused.

Found by review: a chat template that did not accept the rewrite made vLLM answer HTTP 400, and since the checkpoint
stayed, every later turn of the session failed as well. An error answer to a rewritten request that is not about the
request's length or one of its parameters is now reported back (`Outcome.refused`); the compactor serves that
conversation's next turn as sent (a probe: `Outcome.probed` reports vLLM's answer) and, if vLLM takes it, the whole
conversation from then on. A client's own bad request is refused as sent too, and compaction goes on.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

COMPACTED_HEADER = b"x-kvsched-compacted"
REFUSAL_STATUSES = (400, 422)  # vLLM's answers to a request it cannot render (a chat template's exception: 400)
MAX_ERROR_BODY = 65_536  # bytes of an error answer read to tell a template's refusal from a length or parameter error

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


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the middleware does with one request after compaction: forward it (rewritten or not), or refuse it.
    `refused` is called with the answer's status when vLLM refuses a rewritten request (`rewrite_refused`)."""

    changed: bool = False
    replaced: int = 0
    status: int = 200
    error: dict[str, Any] | None = None
    refused: Callable[[int], None] | None = field(default=None, compare=False)
    probed: Callable[[int], None] | None = field(default=None, compare=False)  # a probe's answer status

    def wrap(self, send: Send) -> Send:
        """`send` with `X-KVSched-Compacted` added to the response headers when messages were replaced, unless the
        response is an error (found by review: a request vLLM refused was reported as served compacted); an error
        answer is read to see whether the rewrite caused it. A probe (served as sent after a refusal) reports its
        answer's status."""
        if not self.replaced:
            return send if self.probed is None else self._report_status(send, self.probed)
        value = str(self.replaced).encode()
        error: dict[str, Any] = {}

        async def send_with_header(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = message.get("status", 200)
                if status < 400:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != COMPACTED_HEADER]
                    message = dict(message, headers=[*headers, (COMPACTED_HEADER, value)])
                elif self.refused is not None and status in REFUSAL_STATUSES:
                    error.update(status=status, body=b"")
            elif message["type"] == "http.response.body" and error:
                error["body"] = (error["body"] + message.get("body", b""))[:MAX_ERROR_BODY]
                if not message.get("more_body", False) and self.refused is not None:
                    status, body = error.pop("status"), error.pop("body")
                    error.clear()
                    if rewrite_refused(status, body):
                        self.refused(status)
            await send(message)

        return send_with_header

    @staticmethod
    def _report_status(send: Send, report: Callable[[int], None]) -> Send:
        async def send_reporting(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                report(int(message.get("status", 200)))
            await send(message)

        return send_reporting


UNCHANGED = Outcome()
