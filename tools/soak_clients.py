"""The soak's clients (tools/soak.py): the requests its sessions (tools/soak_sessions.py) send, churn among them, bad
requests and scrapes against one server, each reporting to a shared `Log`. A script's module of its own, beside
tools/soak.py, which imports it."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

SYSTEM = "You are a careful research agent. Use the tools. " * 8  # ~3 blocks of 32 tokens, shared by every session
WORDS = ("rows", "table", "index", "query", "latency", "error", "page", "cache", "shard", "owner", "retry", "join")
MAX_PROMPT = 700  # tokens: a session ends (X-Session-End) past it, well inside max_model_len 1024
CHURN = ("plain",) * 10 + ("disconnect", "disconnect", "abort", "abort", "delete", "delete")
TOP = 3  # top logprobs per token
# A pooled connection is dropped after 2 s idle, below vLLM's keep-alive (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s): a client
# that sends on a connection as the server closes it gets a reset or "Server disconnected" (a POST is not retried).
# Reproduced on stock vLLM (8 clients idling 4.97-5.03 s between POSTs: 2 resets in 162); seen once in a 10-minute soak.
POOL = httpx.Limits(keepalive_expiry=2.0)


def soak_client() -> httpx.Client:
    """An HTTP client whose idle connections never meet the server's keep-alive close (`POOL`)."""
    return httpx.Client(limits=POOL)


@dataclass
class Target:
    """One server as the soak calls it: `key` its API key (or None), `admin` a KVSCHED_ADMIN_KEYS key (kvsched's)."""
    name: str
    base: str
    model: str
    key: str | None = None
    admin: str | None = None
    kvsched: bool = True  # False: a stock server as the soak's subject (an A/A run: stock against stock)
    tenants: tuple[str, ...] = ()  # the server's API keys, each a tenant (kvsched scopes sessions by key); () : `key`
    # Sees every turn's answer (its request's body and headers): tools/soak_ray.py records which replica served it.
    # True: a 5xx it expected (a replica lost meanwhile, answered with a message), not the soak's failure.
    observe: Callable[[dict[str, Any], dict[str, str], httpx.Response], bool] | None = None

    def auth(self, admin: bool = False) -> dict[str, str]:
        key = self.admin if admin else self.key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def as_tenant(self, i: int) -> Target:
        """This server as its `i`-th tenant (modulo their number) calls it."""
        return replace(self, key=self.tenants[i % len(self.tenants)]) if self.tenants else self


@dataclass
class Reply:
    tokens: list[int]
    logprobs: list[float]
    tops: list[dict[int, float]]
    text: str
    prompt_tokens: int
    cached: int | None = None  # usage.prompt_tokens_details.cached_tokens (--enable-prompt-tokens-details), else None
    finish: str = ""
    status: int = 200


@dataclass
class Log:
    """What every thread reports, under one lock."""
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[tuple[str, Reply, Reply, dict[str, Any]]] = field(default_factory=list)  # (kind, a, b, stock's request)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n

    def fail(self, what: str, **detail: Any) -> None:
        with self.lock:
            self.failures.append({"what": what, **detail})

    def pair(self, kind: str, a: Reply, b: Reply, request: dict[str, Any]) -> None:
        with self.lock:
            self.pairs.append((kind, a, b, request))


class Until:
    """When the soak's clients stop: `seconds` after it starts, and not before `min_compared` of the subject's turns
    were compared with stock's, unless `cap_s` passed (so a slow machine's short soak still compares enough turns; its
    report says how long it ran)."""

    def __init__(self, log: Log, seconds: float, min_compared: int = 0, cap_s: float | None = None) -> None:
        self.log, self.start = log, time.monotonic()
        self.end, self.cap = self.start + seconds, self.start + max(seconds, cap_s or seconds)
        self.min_compared = min_compared

    def over(self) -> bool:
        now = time.monotonic()
        if now < self.end:
            return False
        if now >= self.cap:
            return True
        with self.log.lock:
            return sum(kind == "subject" for kind, *_ in self.log.pairs) >= self.min_compared


def body(target: Target, messages: list[dict[str, Any]], max_tokens: int | None, stream: bool = False,
         salt: str | None = None) -> dict[str, Any]:
    """A greedy turn; `max_tokens` None: up to the context limit; `salt`: vLLM's `cache_salt`."""
    return {"model": target.model, "messages": messages, "temperature": 0.0, "seed": 0,
            "logprobs": True, "top_logprobs": TOP, "return_tokens_as_token_ids": True, "stream": stream,
            **({} if max_tokens is None else {"max_tokens": max_tokens}),
            **({} if salt is None else {"cache_salt": salt})}


def parse(reply: dict[str, Any]) -> Reply:
    choice = reply["choices"][0]
    content = (choice.get("logprobs") or {}).get("content") or []
    ids = [int(c["token"].split(":", 1)[1]) for c in content]
    tops = [{int(t["token"].split(":", 1)[1]): float(t["logprob"]) for t in c["top_logprobs"]} for c in content]
    details = reply["usage"].get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return Reply(ids, [float(c["logprob"]) for c in content], tops, choice["message"]["content"] or "",
                 int(reply["usage"]["prompt_tokens"]), None if cached is None else int(cached),
                 choice.get("finish_reason") or "")


def post(client: httpx.Client, target: Target, log: Log, payload: Any, headers: dict[str, str] | None = None,
         what: str = "turn", timeout: float = 120.0) -> httpx.Response:
    sent = {**target.auth(), **(headers or {})}
    r = client.post(target.base + "/v1/chat/completions", json=payload, timeout=timeout, headers=sent)
    if expected(target, payload, sent, r):
        return r
    if r.status_code >= 500:
        log.fail(f"{target.name}: {what} answered {r.status_code}", body=r.text[:500], request=payload,
                 headers=headers)
    return r


def expected(target: Target, payload: Any, headers: dict[str, str], r: httpx.Response) -> bool:
    """`target.observe`'s word on an answer: True for a 5xx it expected (then not the soak's failure)."""
    return target.observe is not None and target.observe(payload if isinstance(payload, dict) else {}, headers, r)


def chat(client: httpx.Client, target: Target, log: Log, messages: list[dict[str, Any]], max_tokens: int | None,
         headers: dict[str, str] | None = None, salt: str | None = None, refused: tuple[int, ...] = ()) -> Reply | None:
    """The turn's reply; None if not answered 200 (a failure unless its status is one of `refused`: then a Reply
    with no tokens and that status)."""
    r = post(client, target, log, body(target, messages, max_tokens, salt=salt), headers)
    if r.status_code in refused:
        return Reply([], [], [], r.text[:200], 0, status=r.status_code)
    if r.status_code != 200:
        if r.status_code < 500:
            log.fail(f"{target.name}: a good turn answered {r.status_code}", body=r.text[:500], headers=headers)
        return None
    return parse(r.json())


def stream_and_leave(client: httpx.Client, target: Target, log: Log, messages: list[dict[str, Any]],
                     headers: dict[str, str], salt: str | None = None) -> None:
    """A client that leaves after the first streamed chunk (vLLM aborts the request when the connection closes)."""
    with client.stream("POST", target.base + "/v1/chat/completions",
                       json=body(target, messages, 16, stream=True, salt=salt),
                       headers={**target.auth(), **headers}, timeout=120) as r:
        if r.status_code >= 500:
            log.fail(f"{target.name}: a stream answered {r.status_code}", request=messages)
        for _ in r.iter_raw():
            break


def abort(client: httpx.Client, target: Target, log: Log, messages: list[dict[str, Any]], headers: dict[str, str],
          rng: random.Random, salt: str | None = None) -> str:
    try:
        post(client, target, log, body(target, messages, 16, salt=salt), headers, "aborted turn",
             timeout=rng.uniform(0.02, 0.4))
        return "completed"
    except httpx.TimeoutException:
        return "left"


def delete(client: httpx.Client, target: Target, log: Log, sid: str) -> int:
    r = client.delete(f"{target.base}/kvsched/sessions/{sid}", headers=target.auth(admin=True), timeout=60)
    if r.status_code >= 500 and expected(target, {}, {}, r):  # (a replica lost meanwhile: Ray's soak)
        return r.status_code
    if r.status_code not in ((200, 404) if target.kvsched else (404,)):  # stock has no such route
        log.fail(f"{target.name}: DELETE of a session answered {r.status_code}", body=r.text[:500], session=sid)
    return r.status_code


def bad_requests(target: Target, log: Log, until: Until, seed: int) -> None:
    """Malformed requests between the turns: each must be refused with a 4xx (or served: an unknown session's end)."""
    rng, n = random.Random(seed), 0
    good = body(target, [{"role": "user", "content": "hi"}], 2)
    cases: list[tuple[str, dict[str, Any] | bytes, dict[str, str], tuple[int, ...]]] = [
        ("messages_not_a_list", {**good, "messages": "hello"}, {}, (400, 422)),
        ("max_tokens_a_string", {**good, "max_tokens": "many"}, {}, (400, 422)),
        ("temperature_a_string", {**good, "temperature": "hot"}, {}, (400, 422)),
        ("content_a_number", {**good, "messages": [{"role": "user", "content": 5}]}, {}, (400, 422)),
        ("too_long_prompt", {**good, "messages": [{"role": "user", "content": "word " * 3000}]}, {}, (400,)),
        ("not_json", b"{not json", {"Content-Type": "application/json"}, (400, 422)),
        ("bad_ttl", good, {"X-Session-Id": "soak-bad", "X-Session-TTL": "soon"}, (400,)),
        ("long_session_id", good, {"X-Session-Id": "x" * 129}, (400,)),
    ]
    with soak_client() as client:
        while not until.over():
            n += 1
            kind, payload, headers, ok = rng.choice(cases if target.kvsched else cases[:6])  # stock: no headers
            try:
                if rng.random() < 0.2:
                    kind, ok = "unknown_session_end", (200,)
                    r = client.post(target.base + "/v1/chat/completions", json=good, timeout=120, headers={
                        **target.auth(), "X-Session-Id": f"soak-never-{seed}-{n}", "X-Session-End": "1"})
                elif rng.random() < 0.1 and target.kvsched:
                    kind, ok = "delete_unknown_session", (404,)
                    r = client.delete(f"{target.base}/kvsched/sessions/soak-never-{seed}-{n}",
                                      headers=target.auth(admin=True), timeout=60)
                else:
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    r = client.post(target.base + "/v1/chat/completions", content=data, timeout=120,
                                    headers={**target.auth(), "Content-Type": "application/json", **headers})
            except httpx.HTTPError as exc:
                log.fail(f"{target.name}: bad request {kind} raised {type(exc).__name__}")
                continue
            log.count(f"{target.name}:bad_{kind}_{r.status_code}")
            if r.status_code not in ok and not (r.status_code >= 500 and expected(target, {}, {}, r)):
                log.fail(f"{target.name}: bad request {kind} answered {r.status_code}", body=r.text[:300])
            time.sleep(rng.uniform(0.1, 0.5))


def scrape(target: Target, log: Log, until: Until) -> None:
    """/metrics and the admin listing, over and over while the soak runs: 200s whose figures stay in the pool."""
    with soak_client() as client:
        while not until.over():
            try:
                m = client.get(target.base + "/metrics", timeout=60)
                s = client.get(target.base + ("/kvsched/sessions?limit=1" if target.kvsched else "/health"),
                               headers=target.auth(admin=True), timeout=60)
            except httpx.HTTPError as exc:
                log.fail(f"{target.name}: scrape raised {type(exc).__name__}")
                time.sleep(0.5)
                continue
            log.count(f"{target.name}:scrapes")
            if m.status_code != 200 or s.status_code != 200:
                log.fail(f"{target.name}: scrape answered {m.status_code}/{s.status_code}", body=s.text[:300])
            elif target.kvsched and not (0 <= (st := s.json()["stats"])["pinned_blocks"] <= st["total_blocks"]
                                         and 0 <= st["free_blocks"] <= st["total_blocks"]):
                log.fail(f"{target.name}: stats out of the pool mid-run", stats=st)
            time.sleep(0.3)
