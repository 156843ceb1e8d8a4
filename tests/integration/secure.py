"""Settings of the shared hardened server (conftest.py) and small HTTP helpers for the tests that use it."""

from __future__ import annotations

import json
from typing import Any

import httpx

from kvsched.serving import ServerSpec, VllmServer

KEYS = ("key-a", "key-b")  # two tenants
ADMIN = "admin-key"
TRIGGER = 300
# Compaction is off for everyone unless a request opts in to summarize, which the operator allows for clients.
ENV = {"KVSCHED_ADMIN_KEYS": ADMIN, "KVSCHED_MAX_TTL_S": "3600", "KVSCHED_COMPACTION_CLIENT_STRATEGIES": "summarize",
       "KVSCHED_COMPACTION_TRIGGER_TOKENS": str(TRIGGER), "KVSCHED_COMPACTION_KEEP_RECENT_MESSAGES": "2",
       "KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS": "8", "KVSCHED_COMPACTION_WAIT_FOR_SUMMARY": "1",
       "KVSCHED_COMPACTION_RETRY_AFTER_S": "0", "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
SYSTEM = "You are a careful research agent. Use the tools. " * 8  # ~ 3 blocks of 32 tokens
__all__ = ["ADMIN", "ENV", "KEYS", "SYSTEM", "TRIGGER", "ServerSpec", "VllmServer", "auth", "chat", "request",
           "rows", "stats"]


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def request(server: VllmServer, method: str, path: str, key: str | None = KEYS[0], body: Any = None,
            headers: dict[str, Any] | None = None, content: bytes | None = None) -> httpx.Response:
    return httpx.request(method, server.base + path, headers={**auth(key), **(headers or {})},
                         json=body if content is None else None, content=content, timeout=120)


def chat(server: VllmServer, messages: list[dict[str, Any]], session: str | None = None, key: str | None = KEYS[0],
         headers: dict[str, Any] | None = None, max_tokens: int = 2, **body: Any) -> httpx.Response:
    hdrs = {**({"X-Session-Id": session} if session else {}), **(headers or {})}
    return request(server, "POST", "/v1/chat/completions", key,
                   {"model": "tiny", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **body}, hdrs)


def rows(server: VllmServer, key: str | None = ADMIN, salt: str | None = None) -> dict[tuple[str, int], dict]:
    """(session id, branch) -> row of every session the key's holder may see (all pages)."""
    out: dict[tuple[str, int], dict] = {}
    cursor = ""
    while True:
        r = request(server, "GET", f"/kvsched/sessions?limit=1000{cursor}", key,
                    headers={"X-KVSched-Cache-Salt": salt} if salt else None)
        assert r.status_code == 200, r.text
        page = r.json()
        out.update({(row["session_id"], row["branch"]): row for row in page["sessions"]})
        if page["next_cursor"] is None:
            return out
        cursor = f"&cursor={page['next_cursor']}"


def stats(server: VllmServer) -> dict[str, float]:
    r = request(server, "GET", "/kvsched/sessions?limit=1", ADMIN)
    assert r.status_code == 200, r.text
    return dict(json.loads(r.text)["stats"])
