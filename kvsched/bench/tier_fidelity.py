"""Greedy-token agreement of turns restored from kvsched's FP8 tier with the same turns recomputed, on one server.

A probe session sends a prompt, a flood of concurrent requests larger than the KV pool forces its pin out (demoted to
the tier), and the session's next turn is served on the restored prefix; the same next turn with a fresh
`cache_salt` (no prefix cache, no tier: vLLM's hashes include the salt) is the recomputed reference. Both are greedy.
Only probes whose next turn really was restored (the server's `kvsched_tier_restored_blocks` grew) are counted.

What the number means on a random-weight model: its logits are nearly flat, so argmax flips on perturbations far
smaller than FP8's (~3% relative RMS): low agreement there says little about a trained model, whose top logit margins
are wide. The KV relative RMS error (measured by the tier at demotion) is the model-independent figure.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from kvsched.serving import VllmServer

RESTORED = "kvsched_tier_restored_blocks_total"


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    probes: int = 4
    prompt_tokens: int = 320
    follow_tokens: int = 24
    max_tokens: int = 24
    flood_factor: float = 1.5  # the flood's tokens / the pool's


def _complete(server: VllmServer, model: str, prompt: list[int], max_tokens: int, session: str | None = None,
              salt: str | None = None) -> list[int]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                            "ignore_eos": True, "return_token_ids": True}
    if salt:
        body["cache_salt"] = salt
    headers = {"Content-Type": "application/json"}
    if session:
        headers["X-Session-Id"] = session
    req = urllib.request.Request(server.url + "/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=300) as r:
        choice = json.loads(r.read())["choices"][0]
    ids = choice.get("token_ids")
    return list(ids) if ids is not None else [hash(ch) for ch in choice["text"]]  # text chars if ids are absent


def _flood(server: VllmServer, model: str, pool_tokens: int, max_model_len: int, factor: float, seed: int) -> list[str]:
    """Sessioned prompts that together exceed the pool `factor` times. Each is pinned when it finishes, so the pins
    pile up until pressure must release older ones (the probe's, demoted to the tier). Returns the flood's sessions."""
    per = max(min(max_model_len - 16, pool_tokens // 4), 64)
    n = max(int(pool_tokens * factor) // per + 1, 2)
    sessions = [f"fidelity-flood-{seed}-{i}" for i in range(n)]
    for i, sid in enumerate(sessions):
        _complete(server, model, [7 + (seed * 131 + i * 17 + j * 7) % 1900 for j in range(per)], 1, session=sid)
    return sessions


def _pinned(server: VllmServer, session: str) -> bool:
    """Whether kvsched still pins KV for `session` (GET /kvsched/sessions)."""
    with urllib.request.urlopen(f"{server.base}/kvsched/sessions", timeout=60) as r:
        listed = json.loads(r.read())
    rows = listed.get("sessions", listed) if isinstance(listed, dict) else listed
    return any(row.get("session_id") == session and row.get("pinned_blocks", 0) > 0 for row in rows)


def _live_flood(server: VllmServer, model: str, pool_tokens: int, max_model_len: int, seed: int) -> None:
    """Concurrent unsessioned prompts that need the whole pool at once (each decodes long enough that all are
    admitted while the first still run): pins must yield to live requests and are demoted to the tier, whatever
    their retention value, and every free block is overwritten."""
    decode = 32
    per = max(min(max_model_len - decode - 16, pool_tokens // 3), 64)
    n = max(pool_tokens // per + 1, 2)
    threads = [threading.Thread(target=_complete, args=(
        server, model, [5 + (seed * 257 + i * 29 + j * 11) % 1900 for j in range(per)], decode)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _end(server: VllmServer, session: str) -> None:
    req = urllib.request.Request(f"{server.base}/kvsched/sessions/{session}", method="DELETE")
    try:
        urllib.request.urlopen(req, timeout=60).close()
    except urllib.error.HTTPError:
        pass  # already gone (404)


def probe(server: VllmServer, model: str, pool_tokens: int, max_model_len: int,
          cfg: ProbeConfig = ProbeConfig()) -> dict[str, Any]:
    """Agreement of restored vs recomputed greedy continuations (see module docstring)."""
    exact = restored = 0
    matched = compared = 0
    prefix_fracs: list[float] = []
    for i in range(cfg.probes):
        prompt = [11 + (i * 997 + j * 13) % 1900 for j in range(cfg.prompt_tokens)]
        session = f"fidelity-probe-{i}"
        first = _complete(server, model, prompt, cfg.max_tokens, session=session)
        flood = _flood(server, model, pool_tokens, max_model_len, cfg.flood_factor, seed=i)
        if _pinned(server, session):  # the flood's own pins scored lower: make live requests take the pool
            _live_flood(server, model, pool_tokens, max_model_len, seed=i)
        follow = prompt + first + [13 + (i * 31 + j) % 1900 for j in range(cfg.follow_tokens)]
        before = server.metrics().get(RESTORED, 0.0)
        got = _complete(server, model, follow, cfg.max_tokens, session=session)
        for sid in [*flood, session]:
            _end(server, sid)
        if server.metrics().get(RESTORED, 0.0) <= before:
            continue  # not restored from the tier (still pinned, or evicted): says nothing about FP8
        restored += 1
        ref = _complete(server, model, follow, cfg.max_tokens, salt=f"recompute-{i}")
        same = sum(a == b for a, b in zip(got, ref, strict=False))
        matched += same
        compared += len(ref)
        exact += got == ref
        lead = next((k for k, (a, b) in enumerate(zip(got, ref, strict=False)) if a != b), min(len(got), len(ref)))
        prefix_fracs.append(lead / max(len(ref), 1))
    return {
        "probes": cfg.probes, "restored_probes": restored,
        "greedy_token_agreement": matched / compared if compared else None,
        "greedy_exact_match_rate": exact / restored if restored else None,
        "greedy_agreeing_prefix_fraction": sum(prefix_fracs) / len(prefix_fracs) if prefix_fracs else None,
        "max_tokens": cfg.max_tokens,
        "note": "random-weight model: near-flat logits make greedy argmax flip on tiny KV perturbations; the KV "
                "relative RMS error is the model-independent figure",
    }
