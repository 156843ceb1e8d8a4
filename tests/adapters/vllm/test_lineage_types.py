"""A prompt whose token ids are numpy integers, through the real hooks with the mypyc-compiled lineage.

vLLM types `Request.prompt_token_ids` as list[int], and its multiprocess engine client cannot even send numpy scalars
(msgpack refuses them); an in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the offline API) takes what the
caller built. The compiled `lineage_tail.repeats` unboxes each token as an int: TypeError, which `SessionResolver`
catches, so the turn was served without its session (pure mode joins it). Fixed where the tokens are read:
`SessionResolver.resolve` (kvsched/adapters/vllm/session_lineage.py) hands the lineage exact ints."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("vllm")

from kvsched import compiled  # noqa: E402
from kvsched.adapters.vllm.harness import RequestFactory, run_until_idle  # noqa: E402
from tests.adapters.vllm.conftest import BLOCK  # noqa: E402
from tests.adapters.vllm.conftest import sched as _sched  # noqa: E402

pytestmark = pytest.mark.skipif(compiled.mode != "compiled", reason=f"kvsched runs {compiled.mode!r}: this guards "
                                "the mypyc build's run-time type checks (`make ext` builds it)")


@pytest.mark.parametrize("session_id", ["named", None], ids=["named", "inferred"])
def test_a_prompt_of_numpy_token_ids_keeps_its_session(harness_cfg, clock, session_id):
    s, f = _sched(harness_cfg, clock=clock), RequestFactory(BLOCK)
    tokens = list(np.arange(100, 150))  # 50 tokens: 3 full blocks and a tail
    for prompt in (tokens, tokens + tokens[:20]):
        s.add_request(f.make(prompt, 3, session_id=session_id))
        run_until_idle(s)
    [(key, rec)] = s.kvsched.policy.sessions.items()
    assert rec.turns == 2 and not s.kvsched.resolver._failed, (key, rec.turns)
