"""Shared by the tests that drive vLLM's real scheduler and block pool through kvsched/adapters/vllm/harness.py."""

from __future__ import annotations

import pytest

from kvsched.adapters.vllm.harness import KVSCHED_SCHEDULER, HarnessConfig, build_scheduler

BLOCK = 16


@pytest.fixture(scope="module")
def harness_cfg(tiny_model_dir):
    """A 64-block pool (63 usable) of 16-token blocks on the tiny model."""
    return HarnessConfig(model_dir=tiny_model_dir, num_blocks=64, block_size=BLOCK, max_model_len=1024)


def sched(cfg, cls=KVSCHED_SCHEDULER, clock=None):
    """A scheduler over `cfg`, kvsched's policy on `clock` when it is kvsched's."""
    s = build_scheduler(cls, cfg)
    if clock is not None and hasattr(s, "kvsched"):
        s.kvsched.policy.clock = clock
    return s


@pytest.fixture(scope="module")
def serve_parser():
    """vLLM's own `vllm serve` parser, with kvsched's hook."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from kvsched.adapters.vllm import compat

    compat.install_parser_hook()
    return make_arg_parser(FlexibleArgumentParser())


@pytest.fixture(scope="module")
def vllm_cli():
    """The `vllm` command's own parser, built as vllm/entrypoints/cli/main.py builds it (its `serve` subcommand, vLLM's
    option types and defaults, FlexibleArgumentParser's --config YAML), with kvsched's hook: parse `serve MODEL ...`."""
    import vllm.entrypoints.cli.serve as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from kvsched.adapters.vllm import compat

    compat.install_parser_hook()
    parser = FlexibleArgumentParser(description="vLLM CLI")
    sub = parser.add_subparsers(required=False, dest="subparser")
    for cmd in serve.cmd_init():
        cmd.subparser_init(sub).set_defaults(dispatch_function=cmd.cmd)
    return parser


def unset_env(monkeypatch, name: str) -> None:
    """`name` unset, and put back as it was afterwards (monkeypatch records nothing to undo for a variable it deletes
    that was not set, and the parser under test sets it)."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


def promote_answered(lv, owner, chain, start, limit, host, request_id="r", timeout_s=10.0) -> int:
    """`TierLevels.promote` as a request's arrival and, once the store's lookup (tier_lookups) has answered, its
    promotion again in the next step (`poll`): the blocks planned by both."""
    n = lv.promote(owner, chain, start, limit, host, request_id)
    if lv.lookups is None:
        return n
    assert lv.lookups.flush(timeout_s)
    if request_id in lv.poll():
        n += lv.promote(owner, chain, start, limit, host, request_id)
    return n
