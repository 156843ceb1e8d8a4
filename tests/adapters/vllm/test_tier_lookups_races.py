"""The store's lookups at an arrival (tier_lookups) against what changes while one is out: the blocks the other
levels held at the arrival can leave before the answer comes."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from tests.adapters.vllm.test_tier_levels_async import HISTORY, arrive, scheduled  # noqa: E402
from tests.adapters.vllm.test_tier_levels_fetch import BOUND_S  # noqa: E402
from tests.adapters.vllm.test_tier_lookups import hung_engine, runs_on, store_asked  # noqa: E402


def test_blocks_the_host_tier_loses_while_the_lookup_is_out_are_fetched_from_the_store(harness_cfg, clock, tmp_path):
    """The host tier held the session's first blocks at its arrival, so the lookup asked the store only past them; they
    were evicted before the answer came, and the answer, starting past where the run now ended, planned nothing."""
    e, f = hung_engine(harness_cfg, clock, tmp_path)
    ra, keys = arrive(e, f, "moved", HISTORY + [7] * 20)
    payloads = e.publish(keys[:10])
    e.directory.admit("other", keys[:3])  # another session's copy of the first three blocks
    e.s.add_request(ra)
    assert store_asked(e) and ra.request_id not in scheduled(e.step())
    assert e.directory.forget(keys[:3]) == 3  # gone from the host tier while the store's answer is out
    e.store.lookup_gate.set()
    assert e.levels.lookups.flush(BOUND_S)
    assert runs_on(e, ra, payloads)
