"""The parser hook that makes `vllm serve MODEL --scheduler kvsched` work."""

import argparse

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402


def _parser():
    p = argparse.ArgumentParser(exit_on_error=False)
    p.add_argument("--scheduler-cls", dest="scheduler_cls", default=None)
    p.add_argument("--scheduler-reserve-full-isl", action="store_true")
    p.add_argument("--middleware", action="append", default=[])
    p.add_argument("--kv-cache-dtype", default="auto")
    compat.extend_engine_parser(p)
    compat.extend_engine_parser(p)  # idempotent
    return p


def test_short_name_selects_the_class_and_the_middleware_is_added():
    ns = _parser().parse_args(["--scheduler", "kvsched", "--middleware", "user.mw"])
    assert ns.scheduler_cls == "kvsched.adapters.vllm.scheduler.KVSchedScheduler"
    assert ns.middleware == [compat.MIDDLEWARE_PATH, "user.mw"]
    assert _parser().parse_args(["--scheduler", "default"]).scheduler_cls is None
    assert _parser().parse_args([]).scheduler_cls is None


def test_scheduler_cls_accepts_paths_and_short_names():
    p = _parser()
    assert p.parse_args(["--scheduler-cls", "kvsched"]).scheduler_cls.endswith("KVSchedScheduler")
    assert p.parse_args(["--scheduler-cls", "a.b.C"]).scheduler_cls == "a.b.C"
    with pytest.raises(argparse.ArgumentError):
        p.parse_args(["--scheduler-cls", "nodots"])


def test_unknown_name_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--scheduler", "nonsense"])
    assert "choose one of: kvsched, default" in capsys.readouterr().err


def test_is_kvsched_scheduler():
    from kvsched.adapters.vllm.scheduler import KVSchedScheduler

    assert compat.is_kvsched_scheduler(KVSchedScheduler)
    assert compat.is_kvsched_scheduler("kvsched.adapters.vllm.scheduler.KVSchedScheduler")
    assert not compat.is_kvsched_scheduler(None) and not compat.is_kvsched_scheduler("vllm.x.Y")


def test_plugin_register_is_idempotent():
    from vllm.engine.arg_utils import EngineArgs

    from kvsched.adapters.vllm import plugin

    plugin.register()
    plugin.register()
    compat.install_parser_hook()
    assert getattr(EngineArgs.__dict__["add_cli_args"].__func__, "__kvsched_wrapped__", False)


@pytest.mark.parametrize("argv", [["--scheduler", "kvsched", "--kv-cache-dtype", "fp8"],
                                  ["--kv-cache-dtype", "fp8_e4m3", "--scheduler", "kvsched"]])
def test_an_fp8_cache_on_a_cpu_without_avx512_is_refused_in_one_line(monkeypatch, capsys, argv):
    from kvsched.ops import cpu_features as cf

    avx2_only = cf.CpuFeatures(arch="x86_64", avx2=True, avx512=False, avx512_bf16=False, amx=False)
    monkeypatch.setattr(cf, "cpu_features", lambda: avx2_only)
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AVX-512 or AMX" in err and "fp8" in err
    # stock vLLM's behaviour is not kvsched's to change; kvsched without fp8 and fp8 on a capable CPU start
    assert _parser().parse_args(["--kv-cache-dtype", "fp8"]).kv_cache_dtype == "fp8"
    assert _parser().parse_args(["--scheduler", "kvsched"]).kv_cache_dtype == "auto"
    monkeypatch.setattr(cf, "cpu_features", lambda: cf.CpuFeatures("x86_64", True, True, False, False))
    assert _parser().parse_args(argv).scheduler_cls.endswith("KVSchedScheduler")


@pytest.fixture(scope="module")
def serve_parser():
    """vLLM's own `vllm serve` parser, with kvsched's hook (its real option names and defaults)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    compat.install_parser_hook()
    return make_arg_parser(FlexibleArgumentParser())


@pytest.mark.parametrize("argv, refused", [
    (["--data-parallel-size", "2"], "--data-parallel-size 2"),  # internal load balancer: turns spread over engines
    (["--data-parallel-size", "4", "--data-parallel-hybrid-lb", "--data-parallel-size-local", "2"], "load balancer"),
    (["--api-server-count", "2"], "--api-server-count 2"),  # API-side state split between processes
    (["--data-parallel-size", "2", "--data-parallel-external-lb"], None),  # one API server per rank: a replica each
    (["--data-parallel-size", "2", "--data-parallel-rank", "1"], None),
    (["--api-server-count", "1"], None),
])
def test_layouts_that_split_a_sessions_state_are_refused_in_one_line(serve_parser, capsys, argv, refused):
    """Found by review (real `vllm serve` runs on this CPU build): with vLLM's internal data-parallel load balancer a
    session's turns alternated between engines and kvsched's stats, list and DELETE saw engine 0 only."""
    capsys.readouterr()
    if refused is None:
        assert serve_parser.parse_args(["--scheduler", "kvsched", *argv]).scheduler_cls.endswith("KVSchedScheduler")
        return
    with pytest.raises(SystemExit) as exc:
        serve_parser.parse_args(["--scheduler", "kvsched", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("kvsched: ") and refused in err[-1]
    assert serve_parser.parse_args(argv).scheduler_cls is None  # stock vLLM's layouts are not kvsched's to refuse
