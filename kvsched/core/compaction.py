"""Context compaction as pure policy: per-session checkpoints of a conversation's older messages.

OpenAI chat is stateless: a client sends its whole history with every request. kvsched keeps, per session, a few
*checkpoints*: "the messages after the system prompt up to `replaced`, whose exact content hashes to `digest`, stand
for `summary`" (or, for the sliding window, for nothing). A request whose messages after its own system prompt begin
with exactly those messages is served on `system prompt + summary + the remaining messages` (in a shape every chat
template accepts: `compaction_layout`); any other request is served as sent. When the client's turns since the last
cut (everything but the system prompt, the summary and the newest turns) pass the trigger, or the served prompt nears
the model's context, the plan carries a `SummaryJob`; the adapter makes the one summarization call and reports the
text back with `commit` (or `failed`). A job is only handed out once per conversation at a time, so concurrent
requests never double-summarise. Records and bounds: `compaction_checkpoints`; prefix digests: `compaction_digests`.

No vLLM, no I/O: token counts per message are computed by the adapter (with the served tokenizer) and passed in.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace

from kvsched.core.compaction_checkpoints import (
    CONVERSATIONS_PER_SESSION,
    Checkpoint,
    Plan,
    SessionState,
    SummaryJob,
    bounded_checkpoints,
    bounded_put,
)
from kvsched.core.compaction_config import CompactionConfig, Strategy
from kvsched.core.compaction_digests import Digests, conversation_root, digests_of, message_digest, prefix_digests
from kvsched.core.compaction_layout import (
    SYSTEM_ROLES,
    Message,
    filler_tokens,
    leading_system_messages,
    place_summary,
    turn_starts,
    with_instruction,
)

Clock = Callable[[], float]
CONTEXT_SHARE = 0.75  # of the model's context: a served prompt this long is compacted whatever the trigger says
__all__ = [  # the store, and what the adapter, the shared store and tests import from here
    "CONTEXT_SHARE", "SYSTEM_ROLES", "Checkpoint", "CompactionStore", "Message", "Plan", "SummaryJob",
    "conversation_root", "leading_system_messages", "message_digest", "prefix_digests"]


class CompactionStore:
    """Per-session checkpoints and the compaction decisions drawn from them (bounded, least recently used first)."""

    def __init__(self, config: CompactionConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.sessions: OrderedDict[str, SessionState] = OrderedDict()
        self.counters: Counter[str] = Counter()

    # ---- planning ---------------------------------------------------------------------------------------------
    def plan(self, session: str, messages: Sequence[Message], token_counts: Sequence[int],
             strategy: Strategy | None = None, input_limit: int | None = None,
             context_tokens: int | None = None) -> Plan:
        """Decide how to serve `messages` (one chat request of `session`); `token_counts[i]` is message i's tokens.
        `input_limit`: the most prompt tokens a summary call may send (the model's context less its output);
        `context_tokens`: the served model's context (compaction also fires at `CONTEXT_SHARE` of it)."""
        if len(token_counts) != len(messages):
            raise ValueError(f"{len(token_counts)} token counts for {len(messages)} messages")
        strategy = self.config.strategy if strategy is None else strategy
        msgs = tuple(messages)
        total = sum(token_counts) + self.config.message_overhead_tokens * len(msgs)
        unchanged = Plan(strategy, msgs, 0, total, total)
        if strategy is Strategy.OFF or not msgs:
            return unchanged
        if strategy is Strategy.CAP:
            if total > self.config.cap_tokens:
                self.counters["refused"] += 1
                return Plan(strategy, msgs, 0, total, total, refusal=(
                    f"this session's context is about {total} tokens, over the context cap of "
                    f"{self.config.cap_tokens} tokens (kvsched compaction strategy 'cap'); shorten the conversation, "
                    f"start a new session, or choose X-KVSched-Compaction: summarize or sliding_window"))
            return unchanged
        state = self._session(session)
        digests = digests_of(msgs)
        root = digests.root
        if root in state.refused or root in state.suspect:  # vLLM refused a rewrite of it: served as sent
            return replace(unchanged, digests=tuple(digests.full), root=root, probe=root in state.suspect)
        plan = self._rewrite(strategy, msgs, token_counts, digests, state, total)
        job = self._maybe_job(session, strategy, msgs, token_counts, digests, state, plan, input_limit,
                              context_tokens)
        if job is not None and strategy is Strategy.SLIDING_WINDOW:  # nothing to call: drop the older turns now
            self._store(state, Checkpoint(job.digest, job.cut, job.system_count, None, root=job.root))
            self.counters["windows"] += 1
            plan = self._rewrite(strategy, msgs, token_counts, digests, state, total)
        elif job is not None:
            state.pending[job.root] = job.digest  # bounded by `_maybe_job`; an in-flight call's entry is never dropped
            self.counters["jobs"] += 1
            plan = replace(plan, original_tokens=total, job=job)
        state.last_tokens = total
        state.peak_served_tokens = max(state.peak_served_tokens, plan.tokens)
        return replace(plan, digests=tuple(digests.full), root=root)

    def _rewrite(self, strategy: Strategy, msgs: tuple[Message, ...], counts: Sequence[int], digests: Digests,
                 state: SessionState, total: int) -> Plan:
        cp = self._matching(strategy, digests, state)
        if cp is None:
            return Plan(strategy, msgs, 0, total, total)
        unused = state.unused.get(cp.root)
        if unused is not None and unused[0] == cp.digest:  # the newest summary is used: no back-off
            del state.unused[cp.root]
        rest = msgs[cp.replaced:]
        head, tokens = self._head(msgs, counts, cp.system_count, cp, rest[0] if rest else None)
        tokens += sum(counts[cp.replaced:]) + self.config.message_overhead_tokens * len(rest)
        return Plan(strategy, (*head, *rest), cp.replaced, tokens, total, kept_system=cp.system_count)

    def _head(self, msgs: tuple[Message, ...], counts: Sequence[int], system_count: int, cp: Checkpoint | None,
              first_kept: Message | None, dropped: bool = True) -> tuple[list[Message], int]:
        """What goes before the kept part (`compaction_layout.place_summary`) and its estimated tokens."""
        o = self.config.message_overhead_tokens
        summary = cp.summary if cp is not None else None
        text = None if summary is None else self.summary_text(summary)
        head, added, filler = place_summary(msgs[:system_count], text, first_kept, self.config.summary_role, dropped)
        tokens = sum(counts[:system_count]) + o * (system_count + added) + filler_tokens(filler)
        return head, tokens + (cp.summary_tokens if cp is not None and summary is not None else 0)

    def _matching(self, strategy: Strategy, digests: Digests, state: SessionState) -> Checkpoint | None:
        """The checkpoint covering the longest exact prefix of the request's messages after its system messages
        (never all of them: the newest message is always served verbatim), with `replaced` and `system_count` as
        they fall in this request."""
        want_summary = strategy is Strategy.SUMMARIZE
        best: Checkpoint | None = None
        for cp in state.checkpoints:
            n = cp.replaced - cp.system_count  # client messages it stands for
            if (cp.summary is not None) != want_summary or n >= len(digests.body) - 1:
                continue
            if digests.body[n] == cp.digest and (best is None or n > best.replaced - best.system_count):
                best = cp
        if best is None:
            return None
        return replace(best, replaced=digests.system + best.replaced - best.system_count, system_count=digests.system)

    def _maybe_job(self, session: str, strategy: Strategy, msgs: tuple[Message, ...], counts: Sequence[int],
                   digests: Digests, state: SessionState, plan: Plan, input_limit: int | None = None,
                   context_tokens: int | None = None) -> SummaryJob | None:
        cfg = self.config
        system_count, root = digests.system, digests.root
        if root in state.pending or len(state.pending) >= CONVERSATIONS_PER_SESSION:
            return None  # one call in flight per conversation; a full table hands out none (never a duplicate)
        failed = state.failed_at.get(root)
        if failed is not None and self.clock() - failed < cfg.retry_after_s:
            return None
        cp = self._matching(strategy, digests, state)
        start = cp.replaced if cp is not None else system_count
        # The kept part starts where a turn group does: a user message, or an assistant message whose predecessor's
        # tool calls all have their results. Found by review: only a user message was a cut, so an agent's tool loop
        # (one user task, then hundreds of assistant tool calls and tool results) was never compacted.
        starts = turn_starts(msgs)
        cut = len(msgs) - cfg.keep_recent_messages
        while cut > start and not starts[cut]:
            cut -= 1
        if cut <= start:
            return None
        # The trigger counts the client's turns since the last cut, never the summary standing for those before it
        # (found by review: a trigger at or below the summary's size re-summarised the summary every turn).
        turns = sum(counts[start:cut]) + cfg.message_overhead_tokens * (cut - start)
        # ... or the served prompt nears the model's context, if that leaves more than a summary's worth of turns to
        # replace (found by review: the default trigger of 5,000 on a 4,096-token model never fired in time)
        near_context = (context_tokens is not None and plan.tokens >= CONTEXT_SHARE * context_tokens
                        and turns > cfg.summary_target_tokens)
        if turns < cfg.trigger_tokens and not near_context:
            return None
        older = turns  # what the call summarises: those turns and the summary before them
        if cp is not None and cp.summary is not None:
            older += cp.summary_tokens + cfg.message_overhead_tokens
        if strategy is Strategy.SUMMARIZE and self._unused_backoff(state, root):
            return None
        base = start
        # A summary call must fit the model's context: the oldest turns are left out of it (found by review: with no
        # checkpoint, e.g. after a restart, a history past the context made every summary call fail, for good). A
        # window makes no call.
        if input_limit is not None and strategy is Strategy.SUMMARIZE:
            o = cfg.message_overhead_tokens
            _, head_tokens = self._head(msgs, counts, system_count, cp, msgs[start])
            size = head_tokens + o + sum(counts[start:cut]) + o * (cut - start) + len(cfg.instruction()) // 2
            while size > input_limit and start < cut:
                size -= counts[start] + o
                start += 1
                while start < cut and not starts[start]:
                    size -= counts[start] + o
                    start += 1
            if start >= cut:  # counted: a summary target near the context leaves room for none (found by review)
                self.counters["summaries_no_room"] += 1
                return None
            if start > base:
                self.counters["summary_inputs_cut"] += 1
        # the conversation as served up to the cut (so its prefix is the session's cached one), then the instruction
        head, _ = self._head(msgs, counts, system_count, cp, msgs[start], dropped=start > base)
        prompt = with_instruction([*head, *msgs[start:cut]], cfg.instruction())
        if turns < cfg.trigger_tokens:
            self.counters["context_triggers"] += 1
        return SummaryJob(session, digests.body[cut - system_count], cut, system_count, tuple(prompt), older, root)

    def _unused_backoff(self, state: SessionState, root: str) -> bool:
        """Hold a new summary back while the conversation's newest summary was never used by a later request (its
        client changes old messages: an edit, a rewritten history), for `retry_after_s`, doubled for each summary in a
        row that went unused (at most 64 times). Found by review: each such turn made a summary call no request used."""
        unused = state.unused.get(root)
        if unused is None:
            return False
        _, committed_at, strikes = unused
        if self.clock() - committed_at < self.config.retry_after_s * 2 ** min(strikes - 1, 6):
            self.counters["summaries_held_back"] += 1
            return True
        return False

    # ---- outcomes of summary calls -----------------------------------------------------------------------------
    def commit(self, job: SummaryJob, summary: str, summary_tokens: int) -> Checkpoint | None:
        """Store the summary a job produced: from now on, requests beginning with the job's exact messages use it.
        None (nothing stored) if the job is no longer pending: its conversation ended (`forget`), its session's state
        went, or vLLM refused its conversation's rewrites (`refuse`) while the call ran. Found by review: an ended
        session was re-created and its summary stored, and a later request under the id was served with the ended
        conversation's summary."""
        state = self.sessions.get(job.session)
        if state is None or state.pending.get(job.root) != job.digest or job.root in state.refused:
            self.counters["summaries_dropped"] += 1
            return None
        del state.pending[job.root]
        self.sessions.move_to_end(job.session)
        state.failed_at.pop(job.root, None)
        cp = Checkpoint(job.digest, job.cut, job.system_count, summary, summary_tokens, job.root)
        self._store(state, cp)
        state.adopted.discard(cp.digest)
        before = state.unused.get(job.root)  # the one before was never used either: a longer back-off
        bounded_put(state.unused, job.root, (cp.digest, self.clock(), before[2] + 1 if before else 1))
        self.counters["summaries"] += 1
        return cp

    def withdraw(self, job: SummaryJob) -> None:
        """A job handed out that will not be run (a call for its conversation is still under way): no longer pending,
        no failure clock."""
        state = self.sessions.get(job.session)
        if state is not None and state.pending.get(job.root) == job.digest:
            del state.pending[job.root]
        self.counters["jobs_withdrawn"] += 1

    def failed(self, job: SummaryJob, reason: str = "error") -> None:
        """The job's call failed or timed out: its requests stay uncompacted; retry after `retry_after_s`. A session
        that ended (or was evicted) meanwhile is not re-created for it."""
        self.counters[f"failed_{reason}"] += 1
        state = self.sessions.get(job.session)
        if state is None:
            return
        if state.pending.get(job.root) == job.digest:
            del state.pending[job.root]
        bounded_put(state.failed_at, job.root, self.clock())

    def suspect(self, session: str, root: str) -> None:
        """vLLM refused a rewritten request of conversation `root` with an error that may be the rewrite's fault or
        the client's own (vLLM names no parameter for either: an unsupported schema, `tool_choice` without tools, an
        image that fails to load). Its next turn is served as sent, a probe (`Plan.probe`): if vLLM takes that, the
        rewrite was the cause (`probed`). Found by review: a client's bad request turned compaction off for good."""
        state = self.sessions.get(session)
        if state is not None and root not in state.refused:
            bounded_put(state.suspect, root, self.clock())

    def probed(self, session: str, root: str, accepted: bool) -> list[Checkpoint]:
        """vLLM answered the probe of a suspect conversation: taken (`accepted`), the rewrite was what it refused
        (`refuse`; returns the dropped checkpoints); refused too, the client's request was, and rewrites go on."""
        state = self.sessions.get(session)
        if state is None or state.suspect.pop(root, None) is None:
            return []
        return self.refuse(session, root) if accepted else []

    def refuse(self, session: str, root: str) -> list[Checkpoint]:
        """vLLM refused a request of conversation `root` that was served rewritten (HTTP 4xx: e.g. a chat template
        that does not take the rewrite). Its checkpoints go and it is served as sent from now on, never summarised
        again (found by review: the checkpoint stayed, so every later turn failed too). Returns the dropped ones."""
        state = self.sessions.get(session)
        if state is None:
            return []
        dropped = [cp for cp in state.checkpoints if cp.root == root]
        state.checkpoints = [cp for cp in state.checkpoints if cp.root != root]
        bounded_put(state.refused, root, self.clock())
        self.counters["rewrites_refused"] += 1
        return dropped

    def summary_text(self, summary: str) -> str:
        """The summary as served: the configured prefix, then the summary (`compaction_layout.place_summary` puts it
        in the system message or a user message of its own)."""
        return self.config.summary_prefix + summary

    def adopt(self, session: str, checkpoints: Sequence[Checkpoint]) -> None:
        """Take checkpoints another replica made for `session` (from the shared store), as if committed here."""
        state = self._session(session)
        for cp in checkpoints:
            self._store(state, cp)
            state.adopted.add(cp.digest)
        state.adopted &= {cp.digest for cp in state.checkpoints}

    def forget(self, session: str, messages: Sequence[Message] | None = None) -> bool:
        """The conversation `messages` of the session ended: drop the checkpoints of that conversation (those whose
        exact prefix it begins with), and the session's state once none is left; `messages` None: all of them. Other
        conversations under the same id (the same user's other chats, `user:` ids) keep theirs, and a job of the ended
        conversation still in flight stores nothing (`commit`). True if the session has no state left."""
        state = self.sessions.get(session)
        if state is not None and messages is not None:
            body = digests_of(tuple(messages)).body
            state.checkpoints = [cp for cp in state.checkpoints if (n := cp.replaced - cp.system_count) >= len(body)
                                 or body[n] != cp.digest]
            ended = set(body)
            for root, digest in list(state.pending.items()):  # this conversation's job (a last turn's never starts)
                if digest in ended:
                    del state.pending[root]
            if state.checkpoints or state.pending:
                return False
        self.sessions.pop(session, None)
        return True

    # ---- views ------------------------------------------------------------------------------------------------
    def checkpoints(self, session: str, own: bool = False) -> list[Checkpoint]:
        """The session's checkpoints, oldest first; `own`: only those made here (not `adopt`ed), which this replica
        writes to the shared store (another's, if it ended or dropped them there, are not written back)."""
        state = self.sessions.get(session)
        if state is None:
            return []
        return [cp for cp in state.checkpoints if not (own and cp.digest in state.adopted)]

    def pending(self) -> int:
        return sum(len(s.pending) for s in self.sessions.values())

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def _session(self, session: str) -> SessionState:
        state = self.sessions.get(session)
        if state is None:
            state = self.sessions[session] = SessionState()
            # Least recently used first, but never a session whose summary call runs (found by review: its state went,
            # its next request started a second call for the same summary, and the first's result was dropped). With
            # every other session waiting for a summary, the store stays over its bound until one lands.
            while len(self.sessions) > self.config.max_sessions:
                victim = next((k for k, s in self.sessions.items() if not s.pending and k != session), None)
                if victim is None:
                    break
                del self.sessions[victim]
        self.sessions.move_to_end(session)
        return state

    def _store(self, state: SessionState, cp: Checkpoint) -> None:
        state.checkpoints = bounded_checkpoints(state.checkpoints, cp, self.config.checkpoints_per_session)
