"""An ASGI request body sent in parts, for unit tests of kvsched's two body readers (the vLLM middleware's and the Ray
ingress's): the `http.request` messages still unread and the `receive` that hands them out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


def body_parts(parts: list[bytes], hang: bool = False) -> tuple[list[dict[str, Any]],
                                                                  Callable[[], Awaitable[dict[str, Any]]]]:
    """(messages not yet received, receive): the body comes in `parts`, then, if `hang`, never ends (a client that
    stops sending); once all are read, a disconnect."""
    messages = [{"type": "http.request", "body": p, "more_body": hang or i < len(parts) - 1}
                for i, p in enumerate(parts)]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        if hang:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    return messages, receive
