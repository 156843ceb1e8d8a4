"""Context compaction on vLLM's API-server side: plans each session's chat request with the compaction core, makes
the summarization call through the same server, rewrites the request, and reports it.

The summarization call goes in-process through the ASGI app below kvsched's middleware (vLLM's own
/v1/chat/completions: chat template, tokenizer, auth and engine exactly as for user traffic; no socket, no host/port).
It carries no session id, so the scheduler never pins it, and the request's `cache_salt`, so its prompt (the session's
own served prefix plus an instruction) is a prefix-cache hit. It is sent with vLLM `priority` = summary_priority
(later than user traffic) — honoured only when the server runs `--scheduling-policy priority`; under the default FCFS
policy vLLM ignores the field. By default it also never delays a user request: the triggering request is served at
once and the summary is used from the next request on (`KVSCHED_COMPACTION_WAIT_FOR_SUMMARY=1` makes it wait).
Failure or timeout of the call never fails a request: it is served uncompacted and the failure is counted.

Per request: header `X-KVSched-Compaction: summarize|sliding_window|cap|off` (or `vllm_xargs.compaction`) picks the
strategy; `off` opts out. Successful responses to requests that were rewritten carry `X-KVSched-Compacted: <client
messages replaced>`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeGuard

from kvsched.adapters.vllm import compat
from kvsched.adapters.vllm.compaction_calls import CHAT_PATH, summary_call
from kvsched.adapters.vllm.compaction_metrics import FAILURE_REASONS, Collector
from kvsched.adapters.vllm.compaction_outcome import UNCHANGED, Outcome
from kvsched.adapters.vllm.compaction_shared import SharedCheckpoints
from kvsched.adapters.vllm.compaction_tokens import MediaCosts, TokenCounter, Tokenizer
from kvsched.adapters.vllm.http_io import error_body, route_path
from kvsched.core.compaction import (
    CONTEXT_SHARE,
    CompactionStore,
    Message,
    Plan,
    SummaryJob,
    conversation_root,
    prefix_digests,
)
from kvsched.core.compaction_config import CompactionConfig, InvalidCompactionInput, Strategy, parse_strategy
from kvsched.core.compaction_digests import conversation_prefixes

logger = logging.getLogger(__name__)

STRATEGY_HEADER = "x-kvsched-compaction"
XARG_STRATEGY = "compaction"
DIGEST_CHARS = 32  # of a conversation digest sent to the engine (128 bits)
COMPACTED_LOOKBACK = 1024  # a rewrite names this many of its messages' latest prefixes (the left branch's last turn:
# an agent turn may add dozens of tool results at once)



class Compactor:
    """One per API server: the summary store, in-flight summary calls (one per session) and counters."""

    def __init__(self, app: Any, config: CompactionConfig | None = None, clock: Callable[[], float] = time.monotonic,
                 tokenizer: Tokenizer | None = None) -> None:
        self.app = app  # the ASGI app below kvsched's middleware: where summary calls go
        self.config = config or _config_from_env()
        self.store = CompactionStore(self.config, clock)
        self.tasks: dict[tuple[str, str], asyncio.Task[None]] = {}  # (session key, conversation root) -> its call
        self.counters: Counter[str] = Counter()
        self.summary_seconds = 0.0
        self._no_room_logged = False
        self._refusal_logged = False
        self._trigger_logged = False
        self._truncated_logged = False
        media = MediaCosts(self.config.image_tokens, self.config.audio_tokens, self.config.video_tokens)
        self.tokens = TokenCounter(tokenizer, media)  # tokens with the served tokenizer, never stalling the loop
        self.shared = SharedCheckpoints.from_env()  # checkpoints in the shared store (KVSCHED_STORE_URL), if any

    # ---- the request path ---------------------------------------------------------------------------------------
    async def prepare(self, scope: Mapping[str, Any], payload: dict[str, Any], headers: Mapping[str, str],
                      tenant: str | None = None) -> Outcome:
        """Plan one request (session fields already applied); rewrites `payload["messages"]` in place if compacted.
        A strategy the operator did not enable for clients (KVSCHED_COMPACTION_CLIENT_STRATEGIES) is refused: 403."""
        xargs = payload.get("vllm_xargs") if isinstance(payload.get("vllm_xargs"), dict) else {}
        raw = headers.get(STRATEGY_HEADER, xargs.get(XARG_STRATEGY))
        field = "X-KVSched-Compaction" if STRATEGY_HEADER in headers else f"vllm_xargs.{XARG_STRATEGY}"
        try:  # checked on every route (found by review: a bad value elsewhere passed), applied to chat only
            strategy = parse_strategy(raw) if raw is not None else self.config.strategy
        except InvalidCompactionInput as exc:
            self.counters["bad_input"] += 1
            return Outcome(status=400, error=error_body(str(exc), field))
        if route_path(scope) != CHAT_PATH:
            return UNCHANGED
        if raw is not None and not self.config.client_may_select(strategy):
            self.counters["refused_choices"] += 1
            return Outcome(status=403, error=error_body(
                f"compaction strategy {strategy.value!r} is not enabled for clients on this server: "
                f"KVSCHED_COMPACTION_CLIENT_STRATEGIES allows {', '.join(self.config.client_choices())}",
                field, code=403))
        session = xargs.get(compat.XARG_SESSION_ID)
        messages = payload.get("messages")
        if not isinstance(session, str) or not _is_message_list(messages):
            return UNCHANGED  # compaction is per session; vLLM validates malformed messages itself
        if strategy is Strategy.OFF:
            if raw is not None:
                self.counters["opt_outs"] += 1
            return self._tagged(payload, messages)
        if self.tokens.oversized(messages, scope):
            return self._oversized(strategy)
        try:
            counts = await self.tokens.counts(messages, scope)
        except Exception:  # no tokenizer (e.g. a server without one): serve as sent
            logger.exception("kvsched compaction: token counting failed; serving uncompacted")
            self.counters["token_count_errors"] += 1
            return self._tagged(payload, messages)
        key = json.dumps([payload.get("model"), payload.get("cache_salt"), tenant, session])
        if self.shared is not None and key not in self.store.sessions:  # moved here: its summaries come along
            try:
                await self.shared.load_into(self.store, key)
            except Exception as exc:  # noqa: BLE001 - never a failed request for the store: planned from local state
                self.shared.note_failure(exc)
        conversation = (key, conversation_root(messages))  # one summary in flight per conversation under the id
        if self.config.wait_for_summary and conversation in self.tasks:
            await self._wait(conversation)  # a summary of this conversation is being made: use it
        plan = self._plan(key, messages, counts, strategy, scope)
        if plan.refusal is not None:
            return Outcome(status=400, error=error_body(plan.refusal, "messages", code="context_cap_exceeded"))
        if plan.job is not None and not xargs.get(compat.XARG_END):  # no summary for a session's last turn
            self._start(plan.job, scope, payload)
            if self.config.wait_for_summary:
                await self._wait(conversation)
                plan = self._plan(key, messages, counts, strategy, scope)
                if plan.job is not None:  # its checkpoint went meanwhile: a job handed out is always started
                    self._start(plan.job, scope, payload)
        if xargs.get(compat.XARG_END):  # this conversation's summaries go; the id's other conversations keep theirs
            self.store.forget(key, messages)
            if self.shared is not None:  # here and in the store (other replicas' other conversations stay)
                self.shared.save(self.store, key, drop_digests=conversation_prefixes(messages))
        return self._apply(plan, payload, key)

    def _apply(self, plan: Plan, payload: dict[str, Any], key: str) -> Outcome:
        # Every turn names the conversation it sent (a digest of the client's messages): the engine notes it on the
        # branch the turn joins. A rewritten turn names the recent prefixes of its messages: the scheduler ends the
        # branch this rewrite leaves behind (its prompt no longer continues it) only if that branch's last turn sent
        # one of them, so it frees that KV now, not at its TTL, and never another conversation's under the same id
        # (kvsched.core.lineage.Lineage.superseded).
        digests = [d[:DIGEST_CHARS] for d in plan.digests]
        if not digests:  # served as sent (the cap strategy): named all the same
            return self._tagged(payload, plan.messages)
        xargs = payload.get("vllm_xargs", {})
        tags: dict[str, Any] = {compat.XARG_CONVERSATION: digests[-1]}
        original = {**payload, "vllm_xargs": {**xargs, **tags}}  # as a turn served as sent goes (`_tagged`)
        if plan.replaced:
            n = len(digests) - 1  # the client's messages
            tags[compat.XARG_COMPACTED] = digests[max(1, n - COMPACTED_LOOKBACK):n]
        payload["vllm_xargs"] = {**xargs, **tags}
        if not plan.replaced:
            if plan.probe:
                return Outcome(changed=True, probed=lambda status: self._probed(key, plan.root, status))
            return Outcome(changed=True)
        payload["messages"] = [dict(m) for m in plan.messages]
        replaced = plan.replaced - plan.kept_system  # the client's messages a summary replaced or the window dropped
        self.counters[f"rewritten_{plan.strategy.value}"] += 1
        self.counters["replaced_messages"] += replaced
        self.counters["saved_tokens"] += max(plan.original_tokens - plan.tokens, 0)
        return Outcome(changed=True, replaced=replaced, original=original,
                       refused=lambda status: self._refused(key, plan.root, status),
                       probed=lambda status: self._probed(key, plan.root, status))

    def _refused(self, key: str, root: str, status: int) -> None:
        """vLLM refused a rewritten request of conversation `root` (`compaction_outcome.rewrite_refused`): the request
        is sent again as the client sent it (`Outcome.forward`), and if vLLM takes that (`_probed`), the conversation
        is served as sent from then on (an answer that says nothing, a server error, leaves its next turn to tell)."""
        self.counters["rewrites_resent"] += 1
        self.store.suspect(key, root)

    def _probed(self, key: str, root: str, status: int) -> None:
        """The answer to a suspect conversation's request served as sent (the refused one sent again, or a next turn):
        taken, the rewrite was the cause: served as sent
        from now on, here and, through the shared store, on other replicas; refused too (4xx), the client's request
        was, and its rewrites go on; a server error says nothing (it stays suspect)."""
        if status >= 500:
            return
        dropped = self.store.probed(key, root, accepted=status < 400)
        if status >= 400:
            return
        if dropped and self.shared is not None:
            self.shared.save(self.store, key, drop_roots=frozenset([root]))
        if not self._refusal_logged:
            self._refusal_logged = True
            logger.warning("kvsched compaction: vLLM refused a compacted request and took it as the client sent it "
                           "(HTTP %d); that conversation is served uncompacted from now on (counted in "
                           "kvsched_compaction_rewrites_refused_total; further ones are not logged). If the served "
                           "chat template rejects the rewrite, try KVSCHED_COMPACTION_SUMMARY_ROLE=user or turn "
                           "compaction off", status)

    def _oversized(self, strategy: Strategy) -> Outcome:
        """A request with a message far larger than the model's context is not tokenized (`TokenCounter.oversized`):
        served as sent, vLLM refuses it with its own length error; under `cap` refused here, never served past the
        operator's cap for want of a count."""
        self.counters["oversized_requests"] += 1
        if strategy is not Strategy.CAP:
            return UNCHANGED
        return Outcome(status=400, error=error_body(
            "a message of this request holds far more text than the served model's context (kvsched compaction "
            "strategy 'cap'); shorten it or start a new session", "messages", code="context_cap_exceeded"))

    def _tagged(self, payload: dict[str, Any], messages: Sequence[Message]) -> Outcome:
        """A turn served as sent still names its conversation, whatever its strategy (off, cap, no tokenizer): a later
        turn may be rewritten (its client may pick another strategy), and the rewrite ends this turn's branch by it.
        Nothing to name on a server where no request can be rewritten."""
        if not messages or (self.config.strategy is Strategy.OFF and not self.config.client_strategies):
            return UNCHANGED
        digest = prefix_digests(messages)[-1][:DIGEST_CHARS]
        payload["vllm_xargs"] = {**payload.get("vllm_xargs", {}), compat.XARG_CONVERSATION: digest}
        return Outcome(changed=True)

    # ---- summary calls ------------------------------------------------------------------------------------------
    def _start(self, job: SummaryJob, scope: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
        conversation = (job.session, job.root)
        running = self.tasks.get(conversation)
        if running is not None and not running.done():  # e.g. the conversation ended and began again meanwhile:
            self.store.withdraw(job)  # never two calls for one conversation (found by review)
            return
        task = asyncio.get_running_loop().create_task(self._summarize(job, scope, payload))
        self.tasks[conversation] = task
        task.add_done_callback(lambda t: self.tasks.pop(conversation, None) if self.tasks.get(conversation) is t
                               else None)

    async def _wait(self, conversation: tuple[str, str]) -> None:
        task = self.tasks.get(conversation)
        if task is not None:
            await asyncio.shield(task)  # a cancelled client request must not cancel the session's summary

    async def _summarize(self, job: SummaryJob, scope: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
        self.counters["summary_calls"] += 1
        t0 = time.perf_counter()
        try:
            reply = await asyncio.wait_for(
                summary_call(self.app, scope, job, payload, self.config, [(STRATEGY_HEADER.encode(), b"off")]),
                self.config.summary_timeout_s)
        except TimeoutError:
            self.store.failed(job, "timeout")
            logger.warning("kvsched compaction: summary call timed out after %.1fs; serving uncompacted",
                           self.config.summary_timeout_s)
            return
        except Exception as exc:
            self.store.failed(job, "error")
            logger.warning("kvsched compaction: summary call failed (%s); serving uncompacted", exc)
            return
        finally:
            self.summary_seconds += time.perf_counter() - t0
        summary = reply.text.strip()
        if not summary:
            self.store.failed(job, "empty")
            return
        if reply.truncated:  # stopped at max_tokens: kept (a retry would stop there again), counted, said once
            self.counters["summaries_truncated"] += 1
            if not self._truncated_logged:
                self._truncated_logged = True
                logger.warning("kvsched compaction: a summary reached KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS=%d "
                               "before its end and was kept cut short (counted in "
                               "kvsched_compaction_summaries_truncated_total; not logged again)",
                               self.config.summary_target_tokens)
        try:
            served = {"role": "user", "content": self.store.summary_text(summary)}
            tokens = (await self.tokens.counts([served], scope))[0]
        except Exception:
            tokens = self.config.summary_target_tokens
        stored = self.store.commit(job, summary, tokens)  # None: the conversation ended meanwhile, nothing to save
        if stored is not None and self.shared is not None:
            self.shared.save(self.store, job.session)

    # ---- the model's context ------------------------------------------------------------------------------------
    def _plan(self, key: str, messages: Sequence[Message], counts: list[int], strategy: Strategy,
              scope: Mapping[str, Any]) -> Plan:
        context = self.tokens.context_tokens(scope) or None
        return self.store.plan(key, messages, counts, strategy, self._input_limit(scope), context)

    def _input_limit(self, scope: Mapping[str, Any]) -> int | None:
        """The most prompt tokens a summary call may send: the served model's context, less the summary's tokens and
        a margin for the chat template (None if the server does not say)."""
        context = self.tokens.context_tokens(scope)
        if not context:
            return None
        room = int(context * 0.9) - self.config.summary_target_tokens
        share = int(context * CONTEXT_SHARE)
        if self.config.trigger_tokens >= share and not self._trigger_logged:  # compaction fires by the context instead
            self._trigger_logged = True
            logger.warning("kvsched compaction: KVSCHED_COMPACTION_TRIGGER_TOKENS=%d is not below %d%% of the served "
                           "model's context (%d tokens): sessions are compacted when their prompt reaches %d tokens",
                           self.config.trigger_tokens, int(CONTEXT_SHARE * 100), context, share)
        if room <= 0 and not self._no_room_logged:  # every summary is then skipped (counted): say why, once
            self._no_room_logged = True
            logger.error("kvsched compaction: a summary of %d tokens (KVSCHED_COMPACTION_SUMMARY_TARGET_TOKENS) leaves "
                         "no room for its input in the served model's context of %d tokens: no summary will be made; "
                         "lower it below %d", self.config.summary_target_tokens, context, int(context * 0.9))
        return max(room, 1)

    # ---- metrics ------------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        c, s = self.counters, self.store.counters
        return {
            "trigger_tokens": float(self.config.trigger_tokens),
            "sessions": float(len(self.store.sessions)),
            "summaries_in_flight": float(len(self.tasks)),
            "summary_calls": float(c["summary_calls"]),
            "summaries": float(s["summaries"]),
            "summaries_dropped": float(s["summaries_dropped"]),
            "summary_seconds": self.summary_seconds,
            "windows": float(s["windows"]),
            "summary_inputs_cut": float(s["summary_inputs_cut"]),
            "summaries_no_room": float(s["summaries_no_room"]),
            "rewrites_refused": float(s["rewrites_refused"]),
            "rewrites_resent": float(c["rewrites_resent"]),
            "summaries_held_back": float(s["summaries_held_back"]),
            "context_triggers": float(s["context_triggers"]),
            "summaries_truncated": float(c["summaries_truncated"]),
            "refused_requests": float(s["refused"]),
            "opt_outs": float(c["opt_outs"]),
            "oversized_requests": float(c["oversized_requests"]),
            "refused_choices": float(c["refused_choices"]),
            "replaced_messages": float(c["replaced_messages"]),
            "saved_tokens": float(c["saved_tokens"]),
            **{f"rewritten_{st.value}": float(c[f"rewritten_{st.value}"]) for st in Strategy},
            **{f"failed_{r}": float(s[f"failed_{r}"]) for r in FAILURE_REASONS},
            **({k: float(v) for k, v in self.shared.counters.items()} if self.shared is not None else {}),
        }

    def render_metrics(self, openmetrics: bool = False, names: Collection[str] | None = None) -> bytes:
        from prometheus_client import CollectorRegistry

        from kvsched.adapters.vllm.metrics import exposition

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Collector(self.stats()))  # type: ignore[arg-type]
        return exposition(registry, openmetrics, names)


# ---- vLLM / ASGI plumbing ---------------------------------------------------------------------------------------
def _config_from_env() -> CompactionConfig:
    """The server's compaction settings; a malformed variable is logged and turns compaction off (the middleware is
    built for every `vllm serve`, and a typo must not take a server down)."""
    try:
        return CompactionConfig.from_env()
    except InvalidCompactionInput as exc:
        logger.error("kvsched compaction disabled: %s", exc)
        return CompactionConfig(strategy=Strategy.OFF)


def _is_message_list(messages: object) -> TypeGuard[list[dict[str, Any]]]:
    return isinstance(messages, list) and bool(messages) and all(isinstance(m, dict) for m in messages)
