"""A vLLM request's session: the vllm_xargs keys kvsched reads, and the engine-core utility call it answers."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from kvsched.adapters.vllm.compat.blocks import cached_prefix
from kvsched.core.sessions import (
    InvalidSessionInput,
    SessionKey,
    TurnHints,
    validate_end_flag,
    validate_role,
    validate_session_id,
    validate_ttl,
)

# vllm_xargs keys kvsched reads (they reach the engine as SamplingParams.extra_args).
XARG_SESSION_ID = "session_id"
XARG_ROLE = "agent_role"
XARG_TTL = "ttl_s"
XARG_END = "session_end"
XARG_TENANT = "kvsched_tenant"  # set by kvsched's API-server middleware only (a client's own value is replaced)
XARG_COMPACTED = "kvsched_compacted"  # set by kvsched's compaction middleware only, on a request it rewrote: the
# digests of its client messages' recent prefixes (the conversations whose branch the rewrite leaves behind)
XARG_CONVERSATION = "kvsched_conversation"  # set by the compaction middleware only: the digest of the client's messages
XARG_INFER = "kvsched_infer"  # 0: keep this request out of session inference (e.g. kvsched's own summary calls)
ENV_KEYED = "KVSCHED_KEYED_SERVER"  # "1" in an engine whose API server checks keys (`mark_keyed_server`)

# Engine-core utility calls: vLLM's EngineCore dispatches a utility request by `getattr(engine_core, name)(*args)`.
# The engine core's attribute `scheduler` is kvsched's scheduler object, which is callable, so the API server reaches
# it with `call_utility_async("scheduler", op, *args)`, executed on the engine-core thread between steps.
SCHEDULER_UTILITY = "scheduler"
PACKED_ARGS = "kvsched_args"  # call_scheduler's arguments travel as {PACKED_ARGS: [...]}


# ---- requests ---------------------------------------------------------------------------------------------------
def _extra_args(request: Any) -> dict[str, Any]:
    """The request's `SamplingParams.extra_args` (where `vllm_xargs` arrive), {} without them."""
    return getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}


_NO_HINTS = TurnHints()
# A SessionKey built by tuple's own constructor, with the fields' defaults written out: a third of the cost of calling
# the named tuple (its generated `__new__` and the NewType are Python calls), for the key each arrival looks up.
_new_key: Callable[[type[SessionKey], tuple[str, str | None, str | None, int, bool]], SessionKey] = tuple.__new__
_ROLE_HINTS: dict[str, TurnHints] = {}  # shared per role (hints are frozen), keyed by the role and by the value as
_ROLE_HINTS_MAX = 256  # sent: one lookup, not a validation, per usual request; bounded (past it: validated each time)


def _hints(extra: dict[str, Any]) -> TurnHints:
    raw = extra.get(XARG_ROLE)
    ttl = extra.get(XARG_TTL)
    end = extra.get(XARG_END)
    if ttl is None and end is None:  # the usual request: no hint or a role only, one shared object per role
        if not raw:
            return _NO_HINTS
        hints = _ROLE_HINTS.get(raw) if type(raw) is str else None
        if hints is None:
            role = validate_role(raw)
            hints = _ROLE_HINTS.get(role)
            if hints is None:
                hints = TurnHints(role=role)
                if len(_ROLE_HINTS) < _ROLE_HINTS_MAX:
                    _ROLE_HINTS[role] = hints
            if type(raw) is str and len(_ROLE_HINTS) < _ROLE_HINTS_MAX:
                _ROLE_HINTS[raw] = hints  # (a valid role is its own lower case: both keys give the same role)
        return hints
    return TurnHints(role=validate_role(raw) if raw else None, ttl_s=validate_ttl(ttl) if ttl is not None else None,
                     end=validate_end_flag(end) if end is not None else False)


def request_session(request: Any, known: Callable[[SessionKey], SessionKey | None] | None = None,
                    ) -> tuple[SessionKey | None, TurnHints]:
    """The named session a vLLM `Request` belongs to (branch 0 of its id, under its salt and tenant) and its hints;
    (None, hints) for a request without a session id (hints still apply to an inferred session).

    The API server's middleware writes the canonical id into `vllm_xargs` (read first: vLLM's own `session_id` is the
    header decoded as Latin-1); the offline API sets `Request.session_id`. An invalid value reaching the engine some
    other way is treated as no session rather than crashing the engine. `known(key)` returns the key object of a
    session already seen (its id was validated then), which is returned instead of validating the id again."""
    # `_extra_args` and `_tenant` written out: this runs for every request added, where each call frame counts
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
    raw_id = extra.get(XARG_SESSION_ID) or getattr(request, "session_id", None)
    try:
        hints = _hints(extra) if extra else _NO_HINTS
    except InvalidSessionInput:
        return None, _NO_HINTS
    if not raw_id:
        return None, hints
    salt = getattr(request, "cache_salt", None)
    tenant = extra.get(XARG_TENANT)
    if type(tenant) is not str or not tenant:
        tenant = None
    try:
        if known is not None and type(raw_id) is str and (seen := known(_new_key(SessionKey, (raw_id, salt, tenant, 0,
                                                                                              False)))):
            return seen, hints
        sid = validate_session_id(raw_id)
    except InvalidSessionInput:
        return None, _NO_HINTS
    return SessionKey(sid, salt, tenant), hints


def _tenant(extra: dict[str, Any]) -> str | None:
    tenant = extra.get(XARG_TENANT)
    return tenant if type(tenant) is str and tenant else None


def request_scope(request: Any) -> tuple[str | None, str | None, bool]:
    """(cache salt, tenant, may join an inferred session) of a request: where session inference may look."""
    extra = _extra_args(request)
    return getattr(request, "cache_salt", None), _tenant(extra), _may_infer(extra.get(XARG_INFER))


def _may_infer(raw: Any) -> bool:
    """`kvsched_infer` read as the API server checks it (`client_fields.validate_infer`): found by probing, "false"
    and "no" passed the check and were read as "infer". A value no check passed (another route) infers, as before."""
    if raw is None or raw is True or raw == 1:
        return True
    try:
        return validate_end_flag(raw)
    except InvalidSessionInput:
        return True


def prompt_block_hashes(request: Any) -> list[Any]:
    """The chained hashes of the request's full blocks (`Request.block_hashes`; only the prompt's when the request is
    added). Empty without prefix caching."""
    return getattr(request, "block_hashes", None) or []


def prompt_view(request: Any) -> tuple[list[Any], Sequence[int] | None, tuple[tuple[int, int], ...]]:
    """(`prompt_block_hashes`, the prompt's token ids (None for prompt embeddings), `opaque_ranges`) of a request just
    added: what session lineage reads of every arriving request, in one call."""
    hashes = getattr(request, "block_hashes", None) or []
    tokens = getattr(request, "prompt_token_ids", None)
    if tokens is not None and not getattr(request, "mm_features", None) and getattr(request, "prompt_embeds",
                                                                                    None) is None:
        return hashes, tokens, ()  # a text prompt: no ranges (as `opaque_ranges`, without its call)
    return hashes, tokens, opaque_ranges(request)


def opaque_ranges(request: Any) -> tuple[tuple[int, int], ...]:
    """The (start, end) ranges of the request's prompt positions whose token ids do not say what they hold: a
    multimodal item's placeholders (the same ids whatever the image; its hash enters the block hashes only) or prompt
    embeddings (all of it). Empty for a text prompt (two attribute reads)."""
    if getattr(request, "prompt_embeds", None) is not None:
        return ((0, int(request.num_prompt_tokens)),)
    features = getattr(request, "mm_features", None)
    if not features:  # a text prompt: no generator and tuple built per request
        return ()
    return tuple((int(f.mm_position.offset), int(f.mm_position.offset) + int(f.mm_position.length)) for f in features)


def finish_anchor(request: Any, hash_block_size: int) -> tuple[tuple[int, Any] | None, bool]:
    """(the computed anchor, `finished_normally`) of a finished request, in one call (lineage reads both of every
    finished turn). The anchor: (index, hash) of the last full block of its prompt and output whose KV was computed
    (every token but the last sampled one: it was never fed back), None if it has none."""
    prompt = int(request.num_prompt_tokens)
    hashes = getattr(request, "block_hashes", None) or []
    full = min(len(hashes), max(prompt // hash_block_size,
                                (prompt + int(request.num_output_tokens) - 1) // hash_block_size))
    return (full - 1, hashes[full - 1]) if full > 0 else None, finished_normally(request)


def keyed_server(environ: Mapping[str, str] | None = None, parent_pid: int | None = None) -> bool:
    """True in an engine whose API server checks API keys: `ENV_KEYED` names this process's parent (the API server
    that set it, `mark_keyed_server`, and then started this engine core as its child), or is "1" (set by hand for
    another launcher; a word other than false/no/off counts as 1, "0" and another process's pid as unset). An engine the API server's own process builds later (offline `LLM(...)`, a notebook, tests
    starting engines in one process) is not its child and is not marked by it (found by review: the variable leaked to
    such engines, which then gave every request no session)."""
    value = (os.environ if environ is None else environ).get(ENV_KEYED, "").strip()
    if not value.isdigit():  # unset, or a word set by hand ("true", "yes"): keyed unless it says no, failing safe
        return value.lower() not in ("", "false", "no", "off")
    return value == "1" or value == str(os.getppid() if parent_pid is None else parent_pid)


def mark_keyed_server(args: Any, environ: MutableMapping[str, str] | None = None) -> None:
    """In the API server, once its arguments are parsed and before it starts the engine core (a child process, which
    inherits the variable): tell the engine whether the server checks API keys (`--api-key`, VLLM_API_KEY), by naming
    this process. kvsched's middleware then scopes every request it rewrites to the caller's key (`XARG_TENANT`), and
    the engine gives a request without that scope no session, named or inferred: it came by a route kvsched does not
    rewrite (found by review: /inference/v1/generate, batch, Cohere, audio and /invocations requests of every key, and
    of unauthenticated callers on /invocations, were inferred into one shared pool)."""
    env = os.environ if environ is None else environ
    if getattr(args, "api_key", None) or env.get("VLLM_API_KEY"):
        env[ENV_KEYED] = str(os.getpid())
    else:
        env.pop(ENV_KEYED, None)


def finished_request_shape(request: Any, hash_block_size: int, computed: int | None = None,
                           ) -> tuple[int, int, list[Any], Sequence[int]]:
    """(prompt tokens, output tokens, hashes of the full blocks whose KV was computed, every token id) of a finished
    request. Every token but the last sampled one has KV (it was never fed back); a prompt's own full blocks always
    count. A request finished (aborted) before its first output token counts only the prompt tokens whose KV the engine
    computed or hit (`num_computed_tokens` at the free; found by review: one aborted mid-prefill was written with its
    whole prompt); `computed` instead when given (`preempted_prompt_tokens`)."""
    prompt = int(request.num_prompt_tokens)
    output = int(request.num_output_tokens)
    if not output:
        prompt = min(prompt, int(request.num_computed_tokens) if computed is None else computed)
    full = max(prompt // hash_block_size, (prompt + output - 1) // hash_block_size)
    return prompt, output, list(prompt_block_hashes(request)[:full]), request.all_token_ids


def request_ran(request: Any) -> bool:
    """True if the request was ever scheduled: it computed (or hit) some of its prompt, produced output, or was
    preempted (its computed count goes back to 0). False for one aborted while it waited."""
    return (int(getattr(request, "num_computed_tokens", 0)) > 0 or int(getattr(request, "num_output_tokens", 0)) > 0
            or int(getattr(request, "num_preemptions", 0)) > 0)  # preempted mid-prefill, then aborted (review)


def preempted_prompt_tokens(scheduler: Any, request: Any, hash_block_size: int) -> int | None:
    """The prompt tokens a request preempted before its first output token, and finished before it ran again, had
    computed: vLLM set its computed count to 0 when it freed its blocks (`_preempt_request`), their hashes kept, so the
    leading run of its prompt's full blocks the prefix cache still holds (one evicted since is lost to the engine too).
    None for any other request (its `num_computed_tokens` says)."""
    if int(request.num_output_tokens) or int(request.num_computed_tokens) or not int(request.num_preemptions):
        return None
    limit = int(request.num_prompt_tokens) // hash_block_size
    return len(cached_prefix(scheduler, prompt_block_hashes(request), limit)) * hash_block_size


_UNANSWERED: tuple[Any, ...] = ()  # vLLM's aborted and failed statuses, read once (an import per finished turn cost
# more than the rest of this check)


def _unanswered() -> tuple[Any, ...]:
    from vllm.v1.request import RequestStatus

    global _UNANSWERED
    _UNANSWERED = (RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_ERROR)
    return _UNANSWERED


def finished_normally(request: Any) -> bool:
    """False if vLLM finished the request aborted (the client went away or timed out) or failed (`Request.status`, a
    `RequestStatus`): the client got no answer, so a request repeating its prompt is likely its retry. True for every
    other finish (stopped, length cap, repetition stop, a prompt ignored as too long): the client got a reply, so a
    repeat is another user's or a new ask. A request without a status (a test's stand-in) counts as normal. Another
    user's identical prompt after an abort reads as the retry too: without a session field, API key or salt of its
    own nothing tells them apart (`kvsched.core.shared_turns`)."""
    return getattr(request, "status", None) not in (_UNANSWERED or _unanswered())


def request_compacted(request: Any) -> bool:
    """True if kvsched's compaction middleware rewrote the request (`XARG_COMPACTED`; a client's own value is dropped
    by the middleware)."""
    return bool(compacted_from(request))


def compacted_from(request: Any) -> frozenset[str]:
    """The conversations a request rewritten by kvsched's compaction continues (`XARG_COMPACTED`: digests of its
    client messages' recent prefixes); empty for a request it did not rewrite."""
    extra = _extra_args(request)
    raw = extra.get(XARG_COMPACTED)
    return frozenset(d for d in raw if isinstance(d, str)) if isinstance(raw, list) else frozenset()


def request_conversation(request: Any) -> str | None:
    """The digest of the client messages a chat request sent (`XARG_CONVERSATION`), when compaction computed one."""
    raw = _extra_args(request).get(XARG_CONVERSATION)
    return raw if isinstance(raw, str) else None
