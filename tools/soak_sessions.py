"""The soak's agent sessions (tools/soak.py): turn after turn with churn (tools/soak_clients.py's requests), each
completed turn compared with stock's, and what multi-tenant agent traffic adds (`SHAPES`, `Soak.salted`):

- tenants: each conversation calls as one of the server's API keys (`Target.tenants`; kvsched scopes a session by
  key and salt), and a salted one's first turn is sent first as another tenant under another fresh `cache_salt` with
  the same session id (the same prompt twice, two salts, two tenants): neither may get a cached token (`Salts`), and
  that twin session's end (X-Session-End) must leave the conversation's session listed to its own key and salt;
- race: the next turn (the history and a new user message) sent while the current one runs, same session id;
- fanout: another task's first turn sent under this session's id while its turn runs (two workers sharing an id);
- edit: an earlier user or tool message rewritten, the session going on from the edited history (a branch);
- long: a last turn padded to within 40 tokens of the context limit, or just past it (refused 400 by both servers),
  its max_tokens at or past what is left (or unset: up to the limit).
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import httpx
from soak_clients import (
    CHURN,
    MAX_PROMPT,
    SYSTEM,
    WORDS,
    Log,
    Reply,
    Target,
    Until,
    abort,
    body,
    chat,
    delete,
    soak_client,
    stream_and_leave,
)

SHAPES = ("race", "fanout", "edit", "long")
SHAPE_MIX = ("plain",) * 8 + SHAPES  # a turn's shape, after the first turn (plain: the turn alone)
LONG_MARGIN = 40  # a near-limit prompt: this many tokens or fewer below max_model_len


class Salts:
    """Which `cache_salt`s were sent already: the first request under a salt can find no cached token (vLLM's block
    hashes, kvsched's pins, tier and lineage all key on the salt), whatever ran before under other salts."""

    def __init__(self) -> None:
        self.used: set[str] = set()
        self.lock = threading.Lock()

    def claim(self, salt: str | None) -> bool:
        """True if `salt` was never sent before (and marks it sent)."""
        if salt is None:
            return False
        with self.lock:
            first = salt not in self.used
            self.used.add(salt)
            return first


@dataclass
class Conv:
    """One conversation as the soak sends it: the subject as its tenant, its session id and headers, its salt."""
    kv: Target
    sid: str
    headers: dict[str, str]
    salt: str | None


@dataclass
class Soak:
    kvsched: Target
    stock: Target | None  # None: invariants only (the compaction server)
    log: Log
    seed: int = 0
    stock_twice: float = 0.25  # the share of turns stock answers twice: its own noise, the tolerance
    shapes: frozenset[str] = frozenset()  # of SHAPES
    salted: float = 0.0  # the share of conversations with a cache_salt of their own
    salts: Salts = field(default_factory=Salts)

    def count(self, what: str, n: int = 1) -> None:
        self.log.count(f"{self.kvsched.name}:{what}", n)

    def session(self, idx: int, until: Until) -> None:
        rng, gen = random.Random(self.seed * 1000 + idx), 0
        with soak_client() as client:
            while not until.over():
                try:
                    self.conversation(client, rng, idx, gen, until)
                except Exception as exc:  # noqa: BLE001 - a refused connection is an engine gone: the report's
                    self.log.fail(f"{self.kvsched.name}: session {idx} raised {type(exc).__name__}: {exc}",
                                  trace=traceback.format_exc()[-2000:])
                    return
                gen += 1

    def salt(self, rng: random.Random, idx: int, gen: int) -> str:
        return f"soak{self.seed}-{self.kvsched.name}-{idx}.{gen}-{rng.getrandbits(40):010x}"

    def conversation(self, client: httpx.Client, rng: random.Random, idx: int, gen: int, until: Until) -> None:
        role = "orchestrator" if idx % 4 == 0 else "worker"
        sid = f"soak{self.seed}-wf{idx // 4}/{role}-{idx % 4}-g{gen}"
        ttl = rng.random() < 0.25  # a session whose 1 s TTL runs out while it idles between some turns
        headers = {"X-Session-Id": sid, "X-Agent-Role": role, **({"X-Session-TTL": "1"} if ttl else {})}
        conv = Conv(self.kvsched.as_tenant(idx + gen), sid, headers,
                    self.salt(rng, idx, gen) if rng.random() < self.salted else None)
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"task {idx}.{gen}: " + " ".join(rng.choices(WORDS, k=30))}]
        turns = rng.randint(2, 7)
        for t in range(turns):
            shape = rng.choice(SHAPE_MIX) if t else "plain"
            shape = shape if shape in self.shapes else "plain"
            last = t == turns - 1 or until.over() or shape == "long"
            hdrs = {**headers, **({"X-Session-End": "1"} if last else {})}
            twin = self.twin(client, rng, messages, conv, idx + gen + 1) if t == 0 and conv.salt is not None else None
            fresh = self.salts.claim(conv.salt)  # before the churn's requests, which send the salt too
            churn = rng.choice(CHURN)
            self.count(f"churn_{churn}")
            if churn == "disconnect":
                stream_and_leave(client, conv.kv, self.log, messages, headers, conv.salt)
            elif churn == "abort":
                self.count(f"abort_{abort(client, conv.kv, self.log, messages, headers, rng, conv.salt)}")
            fresh = fresh and churn in ("plain", "delete")
            if shape == "edit":
                messages = self.edit(rng, messages)
            self.count(f"shape_{shape}")
            if shape == "long":
                self.long(client, rng, messages, hdrs, conv)
                self.count("sessions_ended")
                return
            side = self.aside(client, rng, messages, hdrs, conv, shape) if shape in ("race", "fanout") else None
            reply = self.turn(client, rng, messages, hdrs, conv, churn == "delete", rng.randint(3, 12), fresh)
            if side is not None:
                side.join()
            if twin is not None:
                self.twin_end(client, rng, messages, twin, conv, reply is not None and not (last or ttl)
                              and churn != "delete")
            if reply is None:
                return
            if last or reply.prompt_tokens > MAX_PROMPT:
                self.count("sessions_ended" if last else "sessions_left_open")
                return
            messages = messages + [{"role": "assistant", "content": reply.text},
                                   {"role": "tool", "tool_call_id": f"call_{t}",
                                    "content": f"result {t}: " + " ".join(rng.choices(WORDS, k=rng.randint(10, 90)))}]
            if ttl and rng.random() < 0.5:
                self.count("ttl_idles")
                time.sleep(rng.uniform(1.2, 2.0))

    def twin(self, client: httpx.Client, rng: random.Random, messages: list[dict[str, Any]], conv: Conv,
             tenant: int) -> Conv:
        """The conversation's first prompt, sent first as another tenant under another fresh salt with the same
        session id: that twin session's first request (no cached token allowed, as for the conversation's next)."""
        other = Conv(self.kvsched.as_tenant(tenant), conv.sid, conv.headers, self.salt(rng, tenant, -1))
        self.count("salt_twins")
        self.turn(client, rng, messages, other.headers, other, False, 4, self.salts.claim(other.salt))
        return other

    def twin_end(self, client: httpx.Client, rng: random.Random, messages: list[dict[str, Any]], twin: Conv,
                 conv: Conv, check: bool) -> None:
        """The twin's prompt once more under its salt, ending its session (X-Session-End): a hit expected, the check's
        power (a miss is no failure: the pool is small). With `check`, the conversation's session (same id, another
        tenant or salt) must live on: listed to its own key and salt (kvsched's scope of a session)."""
        again = self.turn(client, rng, messages, {**twin.headers, "X-Session-End": "1"}, twin, False, 4)
        if again is not None and again.cached is not None:
            self.count("salt_repeat_hit" if again.cached > 0 else "salt_repeat_miss")
        if not (check and self.kvsched.kvsched and conv.salt is not None):
            return
        r = client.get(self.kvsched.base + "/kvsched/sessions?limit=1000", timeout=60,
                       headers={**conv.kv.auth(), "X-KVSched-Cache-Salt": conv.salt})
        if r.status_code != 200:
            self.log.fail(f"{self.kvsched.name}: a tenant's listing answered {r.status_code}", body=r.text[:300])
        elif conv.sid not in {row["session_id"] for row in r.json()["sessions"]}:
            self.log.fail(f"{self.kvsched.name}: session {conv.sid} gone after another tenant/salt ended its id",
                          listed=r.json()["sessions"][:5])
        else:
            self.count("scope_checks")

    def aside(self, client: httpx.Client, rng: random.Random, messages: list[dict[str, Any]], hdrs: dict[str, str],
              conv: Conv, shape: str) -> threading.Thread:
        """A second turn of this session id, started before this turn: the next turn (race: the client did not wait
        for the answer) or another task's first turn (fanout: a worker reusing the id). Compared with stock too."""
        if shape == "race":
            other = messages + [{"role": "user", "content": "meanwhile: " + " ".join(rng.choices(WORDS, k=8))}]
        else:
            other = [messages[0], {"role": "user", "content": "other task: " + " ".join(rng.choices(WORDS, k=30))}]
        side_rng = random.Random(rng.getrandbits(32))
        headers = {k: v for k, v in hdrs.items() if k != "X-Session-End"}
        def run() -> None:
            try:
                self.turn(client, side_rng, other, headers, conv, False, side_rng.randint(3, 12))
            except Exception as exc:  # noqa: BLE001 - the report's, as a session's own
                self.log.fail(f"{self.kvsched.name}: a {shape} turn raised {type(exc).__name__}: {exc}",
                              trace=traceback.format_exc()[-2000:])

        runner = threading.Thread(target=run)
        runner.start()
        time.sleep(rng.uniform(0.0, 0.05))
        return runner

    def edit(self, rng: random.Random, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The history with one earlier user or tool message rewritten (its last message kept)."""
        earlier = [i for i, m in enumerate(messages[:-1]) if m["role"] in ("user", "tool")] or [len(messages) - 1]
        i = rng.choice(earlier)
        return [*messages[:i], {**messages[i], "content": "edited: " + " ".join(rng.choices(WORDS, k=20))},
                *messages[i + 1:]]

    def tokens(self, client: httpx.Client, messages: list[dict[str, Any]]) -> tuple[int, int]:
        """(prompt tokens, max_model_len) of a chat turn, by the server's /tokenize (stock's, when compared)."""
        target = self.stock or self.kvsched
        r = client.post(target.base + "/tokenize", json={"model": target.model, "messages": messages},
                        headers=target.auth(), timeout=60)
        r.raise_for_status()
        out = r.json()
        return int(out["count"]), int(out["max_model_len"])

    def long(self, client: httpx.Client, rng: random.Random, messages: list[dict[str, Any]], hdrs: dict[str, str],
             conv: Conv) -> None:
        """A last turn near the context limit: a tool result padded to within LONG_MARGIN tokens below it (3 in 4) or
        just past it; `max_tokens` unset, a few or past what is left. Both servers must refuse the same (400) or
        decode alike up to the limit."""
        def padded(k: int) -> list[dict[str, Any]]:
            return messages + [{"role": "tool", "tool_call_id": "call_long",
                                "content": "long result: " + " ".join(WORDS[j % len(WORDS)] for j in range(k))}]

        n0, limit = self.tokens(client, padded(0))
        per = max(0.5, (self.tokens(client, padded(100))[0] - n0) / 100)
        want = limit - rng.randint(1, LONG_MARGIN) if rng.random() < 0.75 else limit + rng.randint(0, 4)
        k = max(0, round((want - n0) / per))
        for _ in range(4):
            n = self.tokens(client, padded(k))[0]
            if abs(n - want) <= 2:
                break
            k = max(0, k + round((want - n) / per))
        else:  # k moved after the last count: count what is sent (review70: the label read the count before)
            n = self.tokens(client, padded(k))[0]
        over = n >= limit
        self.count("long_over_limit" if over else "long_near_limit")
        max_tokens = rng.choice([None, rng.randint(1, 8), 64])
        reply = self.turn(client, rng, padded(k), hdrs, conv, False, max_tokens, refused=(400,))
        if reply is not None and reply.status == 200:
            self.count(f"long_finish_{reply.finish}")

    def turn(self, client: httpx.Client, rng: random.Random, messages: list[dict[str, Any]], hdrs: dict[str, str],
             conv: Conv, delete_meanwhile: bool, max_tokens: int | None, fresh: bool = False,
             refused: tuple[int, ...] = ()) -> Reply | None:
        """One turn on the subject, compared with stock's answer to it (same salt; `refused`: statuses both may
        answer instead, then they must answer the same). `fresh`: the first request under its salt (no cached token
        allowed)."""
        kv, salt = conv.kv, conv.salt
        if delete_meanwhile:  # the session's DELETE while its turn runs: the turn must still decode right
            out: list[Reply | None] = []

            def run() -> None:  # an error here is the soak's failure, as on the turn's own thread
                try:
                    out.append(chat(client, kv, self.log, messages, max_tokens, hdrs, salt, refused))
                except Exception as exc:  # noqa: BLE001 - reported, not left to threading's excepthook
                    self.log.fail(f"{kv.name}: a turn beside its session's DELETE raised {type(exc).__name__}: {exc}",
                                  trace=traceback.format_exc()[-2000:])

            runner = threading.Thread(target=run)
            runner.start()
            time.sleep(rng.uniform(0.0, 0.3))
            with soak_client() as other:
                self.count(f"delete_{delete(other, kv, self.log, conv.sid)}")
            runner.join()
            reply = out[0] if out else None
        else:
            reply = chat(client, kv, self.log, messages, max_tokens, hdrs, salt, refused)
        if reply is None:
            return None
        self.check_cached(reply, fresh, salt, conv.sid)
        if reply.status == 200:
            self.count("turns")
        if self.stock is not None:
            first = chat(client, self.stock, self.log, messages, max_tokens, salt=salt, refused=refused)
            if first is None:
                return None
            if first.status != reply.status:
                self.log.fail(f"{kv.name}: answered {reply.status} where stock answered {first.status}",
                              request=body(self.stock, messages, max_tokens, salt=salt), subject=reply.text,
                              stock=first.text)
                return None
            if reply.status != 200:
                self.count(f"refused_alike_{reply.status}")
                return reply
            self.log.pair("subject", reply, first, body(self.stock, messages, max_tokens, salt=salt))
            if rng.random() < self.stock_twice:
                again = chat(client, self.stock, self.log, messages, max_tokens, salt=salt)
                if again is not None:
                    self.log.pair("stock", again, first, body(self.stock, messages, max_tokens, salt=salt))
        return reply

    def check_cached(self, reply: Reply, fresh: bool, salt: str | None, sid: str) -> None:
        if reply.status != 200 or reply.cached is None:
            self.count("cached_unreported" if fresh else "cached_unread")
            return
        self.count("salted_cached_tokens" if salt is not None else "unsalted_cached_tokens", reply.cached)
        if fresh:
            self.count("salt_fresh_checked")
            if reply.cached:
                self.log.fail(f"{self.kvsched.name}: the first request under salt {salt} got {reply.cached} cached "
                              "tokens (another salt's KV)", session=sid, prompt_tokens=reply.prompt_tokens)
