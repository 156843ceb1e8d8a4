"""tools/soak.py's short version: a mixed soak against the suite's shared servers (the hardened kvsched server: a
48-block pool with the FP8 tier on by default; stock vLLM as "replay", in the same dtype). No start-up of its own: its
time is the soak's (SECONDS, longer until MIN_COMPARED turns were compared) and the sessions' end."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.integration.secure import ADMIN, KEYS  # noqa: E402
from tests.tools_loader import load_tool  # noqa: E402

pytestmark = pytest.mark.integration
SECONDS = 12.0  # 15 before the tenants, salts and turn shapes (their extra requests)
SESSIONS = 4
MIN_COMPARED = 12  # run on past SECONDS until this many turns were compared (a slow CPU), ...
CAP_S = 180.0  # ... up to this
# Stock's own logprob noise on this CPU build, from an A/A run (`tools/soak.py --aa`: stock against stock under the same
# soak; BENCHMARKS.md, "A mixed soak against stock vLLM"): 30 s of this test sends too few turns to stock twice to
# measure it (it may see no divergence at all, then take a one-step near tie for a mismatch).
AA_TOL = 0.00797


def test_a_short_soak_decodes_as_stock_and_leaves_no_pin_block_or_tier_slot(secure_server, stock_server):
    """Concurrent sessions with churn (clients leaving, aborts, DELETEs in flight, X-Session-End, expired TTLs), bad
    requests and scrapes, as the server's two tenants (API keys), half the conversations under a cache_salt of their
    own (their first prompt sent first under another tenant and salt), and turns of every shape (the next turn sent
    before the answer, another task under the same session id, an earlier message edited, a prompt near the context
    limit or past it): no 5xx, every completed turn decodes as stock decodes it (or breaks a near tie stock itself
    sees), a refused one is refused by stock too, and once every session is ended no pin, every block free and the
    tier empty; the engine serves on. The server's other sessions end too (its modules each use their own ids and keep
    nothing across modules). The server reports each request's cached tokens (--enable-prompt-tokens-details): the
    first request under a fresh salt gets none (another salt's KV would be a failure of the soak's)."""
    assert secure_server.spec.serve_dtype() == stock_server.spec.serve_dtype()
    assert secure_server.spec.max_model_len == stock_server.spec.max_model_len
    soak = load_tool("soak")
    report = soak.soak(soak.Target("kvsched", secure_server.base, "tiny", KEYS[0], ADMIN, tenants=KEYS),
                       soak.Target("stock", stock_server.base, stock_server.spec.served_model_name),
                       SECONDS, SESSIONS, seed=68, tol=AA_TOL, min_compared=MIN_COMPARED, cap_s=CAP_S)
    verdict, counts = report["verdict"], report["counts"]
    assert not report["failures"], report["failures"][:5]
    assert not verdict["mismatches"], verdict["mismatches"][:3]
    assert verdict["compared"] >= 10 and counts["kvsched:scrapes"] >= 10, (verdict, counts)
    # the new traffic ran (seed 68, 12 s here: 3 twins, 1 scope check, every shape once or twice, one turn past the
    # limit refused by both)
    assert counts.get("kvsched:salt_twins", 0) >= 1, counts
    # salt isolation judged: fresh salts' first requests answered with their cached tokens (0, else a failure above)
    assert counts.get("kvsched:salt_fresh_checked", 0) >= 1 and "kvsched:salted_cached_tokens" in counts, counts
    assert sum(n for k, n in counts.items() if k.startswith("kvsched:shape_") and k != "kvsched:shape_plain"), counts
    # the comparison has teeth: most turns judged against stock's answer to another turn's prompt are mismatches (not
    # all: the random-weight model's few greedy tokens for two prompts sometimes coincide; 61 of 71 in a first run)
    assert verdict["control_caught"] >= 0.5 * verdict["control_pairs"], verdict
    end = report["end"]["kvsched"]
    assert end["pinned_blocks"] == 0 and end["free_blocks"] == end["total_blocks"] and end["tier_blocks"] == 0
