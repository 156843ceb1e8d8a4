"""The parser hook that makes `vllm serve MODEL --scheduler kvsched` work."""

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402
from tests import ahead  # noqa: E402
from tests.ahead import Run  # noqa: E402
from tests.integration.servers import BAD_TIER_SIZES  # noqa: E402


def serve(parser, *argv: str):
    return parser.parse_args(["serve", "MODEL", *argv])


def test_short_name_selects_the_class_and_the_middleware_is_added(vllm_cli):
    ns = serve(vllm_cli, "--scheduler", "kvsched", "--middleware", "user.mw")
    assert ns.scheduler_cls == "kvsched.adapters.vllm.scheduler.KVSchedScheduler"
    assert ns.middleware == [compat.MIDDLEWARE_PATH, "user.mw"]
    assert serve(vllm_cli, "--scheduler-cls", "kvsched").middleware == [compat.MIDDLEWARE_PATH]
    for stock in (serve(vllm_cli, "--scheduler", "default"), serve(vllm_cli)):
        # found by review: the middleware was every server's default, and read KVSCHED_* (even a Redis client) there
        assert stock.scheduler_cls is None and stock.middleware == []
    assert serve(vllm_cli, "--middleware", "user.mw").middleware == ["user.mw"]


def test_scheduler_cls_takes_kvscheds_short_names_and_leaves_the_rest_to_vllm(vllm_cli, tmp_path):
    """Found by review: kvsched's type replaced vLLM's (`optional_type(str)`), so `--scheduler-cls None`, `""` and YAML
    `scheduler-cls: null` were refused on any server with the plugin installed, kvsched selected or not."""
    assert serve(vllm_cli, "--scheduler-cls", "kvsched").scheduler_cls.endswith("KVSchedScheduler")
    assert serve(vllm_cli, "--scheduler-cls", "a.b.C").scheduler_cls == "a.b.C"
    for value in ("None", ""):
        assert serve(vllm_cli, "--scheduler-cls", value).scheduler_cls is None
    (tmp_path / "null.yaml").write_text("scheduler-cls: null\n")
    assert serve(vllm_cli, "--config", str(tmp_path / "null.yaml")).scheduler_cls is None
    assert serve(vllm_cli, "--scheduler-cls", "nodots").scheduler_cls == "nodots"  # as stock vLLM parses it


def test_unknown_name_lists_the_choices(vllm_cli, capsys):
    with pytest.raises(SystemExit):
        serve(vllm_cli, "--scheduler", "nonsense")
    assert "choose one of: kvsched, default" in capsys.readouterr().err


def test_is_kvsched_scheduler():
    from kvsched.adapters.vllm.scheduler import KVSchedScheduler

    assert compat.is_kvsched_scheduler(KVSchedScheduler)
    assert compat.is_kvsched_scheduler("kvsched.adapters.vllm.scheduler.KVSchedScheduler")
    assert not compat.is_kvsched_scheduler(None) and not compat.is_kvsched_scheduler("vllm.x.Y")
    assert not compat.is_kvsched_scheduler("no_such_module.Sched")


def test_a_subclass_of_kvscheds_scheduler_is_kvsched(vllm_cli, tmp_path, monkeypatch):
    """Found by review: `--scheduler-cls myco.MyKV` (a KVSchedScheduler subclass) was taken for another scheduler by
    its path, so the server ran it without the FP8 tier, the KVSCHED_* checks and the middleware."""
    (tmp_path / "myco_sched.py").write_text("from kvsched.adapters.vllm.scheduler import KVSchedScheduler\n\n\n"
                                            "class MyKV(KVSchedScheduler):\n    pass\n\n\nclass Other:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert compat.is_kvsched_scheduler("myco_sched.MyKV") and not compat.is_kvsched_scheduler("myco_sched.Other")
    ns = serve(vllm_cli, "--scheduler-cls", "myco_sched.MyKV")
    assert ns.middleware == [compat.MIDDLEWARE_PATH] and ns.kv_transfer_config is not None
    stock = serve(vllm_cli, "--scheduler-cls", "myco_sched.Other")
    assert stock.middleware == [] and stock.kv_transfer_config is None


def test_the_entry_point_register_hooks_a_fresh_vllm_parser_once(monkeypatch):
    """vLLM loads `vllm.general_plugins` entry points in every process, maybe more than once. Found by review: this test
    installed the hook itself, so it passed with a register() that did nothing."""
    from importlib.metadata import entry_points

    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from kvsched.adapters.vllm import plugin

    assert {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}.get("kvsched") == \
        "kvsched.adapters.vllm.plugin:register"
    current = EngineArgs.__dict__["add_cli_args"].__func__
    stock = getattr(current, "__wrapped__", current)  # vLLM's own, whatever an earlier test installed
    monkeypatch.setattr(EngineArgs, "add_cli_args", staticmethod(stock))
    monkeypatch.setattr(plugin, "_registered", False)
    assert "--scheduler" not in EngineArgs.add_cli_args(FlexibleArgumentParser())._option_string_actions
    plugin.register()
    plugin.register()
    assert EngineArgs.__dict__["add_cli_args"].__func__.__wrapped__ is stock  # wrapped once
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--scheduler", "kvsched"]).scheduler_cls.endswith("KVSchedScheduler")


@pytest.mark.parametrize("argv", [["--scheduler", "kvsched", "--kv-cache-dtype", "fp8"],
                                  ["--kv-cache-dtype", "fp8_e4m3", "--scheduler", "kvsched"]])
def test_an_fp8_cache_on_a_cpu_without_avx512_is_refused_in_one_line(vllm_cli, monkeypatch, capsys, argv):
    from kvsched.ops import cpu_features as cf

    avx2_only = cf.CpuFeatures(arch="x86_64", avx2=True, avx512=False, avx512_bf16=False, amx=False)
    monkeypatch.setattr(cf, "cpu_features", lambda: avx2_only)
    with pytest.raises(SystemExit) as exc:
        serve(vllm_cli, *argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "AVX-512 or AMX" in err and "fp8" in err
    # stock vLLM's behaviour is not kvsched's to change; kvsched without fp8 and fp8 on a capable CPU start
    assert serve(vllm_cli, "--kv-cache-dtype", "fp8").kv_cache_dtype == "fp8"
    assert serve(vllm_cli, "--scheduler", "kvsched").kv_cache_dtype == "auto"
    monkeypatch.setattr(cf, "cpu_features", lambda: cf.CpuFeatures("x86_64", True, True, False, False))
    assert serve(vllm_cli, *argv).scheduler_cls.endswith("KVSchedScheduler")


@pytest.mark.parametrize("argv, refused", [
    (["--data-parallel-size", "2"], "--data-parallel-size 2"),  # internal load balancer: turns spread over engines
    (["--data-parallel-size", "4", "--data-parallel-hybrid-lb", "--data-parallel-size-local", "2"], "load balancer"),
    (["--api-server-count", "2"], "--api-server-count 2"),  # API-side state split between processes
    (["--data-parallel-size", "2", "--data-parallel-external-lb"], None),  # one API server per rank: a replica each
    (["--data-parallel-size", "2", "--data-parallel-rank", "1"], None),
    (["--api-server-count", "1"], None),
])
def test_layouts_that_split_a_sessions_state_are_refused_in_one_line(vllm_cli, capsys, argv, refused):
    """Found by review (real `vllm serve` runs on this CPU build): with vLLM's internal data-parallel load balancer a
    session's turns alternated between engines and kvsched's stats, list and DELETE saw engine 0 only."""
    capsys.readouterr()
    if refused is None:
        assert serve(vllm_cli, "--scheduler", "kvsched", *argv).scheduler_cls.endswith("KVSchedScheduler")
        return
    with pytest.raises(SystemExit) as exc:
        serve(vllm_cli, "--scheduler", "kvsched", *argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith("kvsched: ") and refused in err[-1]
    assert serve(vllm_cli, *argv).scheduler_cls is None  # stock vLLM's layouts are not kvsched's to refuse


@pytest.mark.parametrize("partition, stages", [("2,0", "2"), ("0,2", "2"), ("1,1", "3")])
def test_a_layer_partition_vllm_cannot_serve_is_refused_before_the_engine_starts(vllm_cli, capsys, monkeypatch,
                                                                                  partition, stages):
    """VLLM_PP_LAYER_PARTITION giving a stage 0 layers: vLLM 0.32 splits the model so (get_pp_indices), then its engine
    core fails sizing that stage's KV cache, after loading the model; one of another length fails in its workers."""
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", partition)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        serve(vllm_cli, "--scheduler", "kvsched", "--pipeline-parallel-size", stages)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"kvsched: VLLM_PP_LAYER_PARTITION='{partition}'")
    assert serve(vllm_cli, "--pipeline-parallel-size", stages).scheduler_cls is None  # stock vLLM's to refuse
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,1")
    assert serve(vllm_cli, "--scheduler", "kvsched", "--pipeline-parallel-size", "2").pipeline_parallel_size == 2


def register_probe() -> Run:
    import sys

    probe = ("import sys, vllm.engine.arg_utils\nbefore = set(sys.modules)\n"
             "from kvsched.adapters.vllm import plugin\nplugin.register()\n"
             "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}), "
             "[m for m in set(sys.modules) - before if m.startswith('vllm.entrypoints')])")
    return Run([sys.executable, "-c", probe])


AHEAD = {"test_register_pulls_no_api_server_modules_into_engine_processes": register_probe}  # tests/ahead.py


def test_register_pulls_no_api_server_modules_into_engine_processes():
    """register() runs in every engine-core and worker process. Found by review: importing compat read vLLM's auth
    middleware's paths at import time, pulling FastAPI, Starlette and pydantic's extras into each (~100 modules)."""
    import sys

    out = ahead.result(sys.modules[__name__], "test_register_pulls_no_api_server_modules_into_engine_processes",
                       timeout_s=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['kvsched'] []", out.stdout


def test_a_scheduler_cls_module_that_cannot_be_kvscheds_is_not_imported_at_parse_time(vllm_cli, tmp_path, monkeypatch):
    """Found by review: every --scheduler-cls outside vLLM was imported in the API server at parse time, kvsched
    selected or not (a user's or platform plugin's module-level code ran there), and a module calling sys.exit at
    import ended the parse (`except Exception` misses SystemExit)."""
    import sys

    pkg = tmp_path / "fu_userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("IMPORTED = True  # its package must not be imported either\n")
    (pkg / "plain.py").write_text("from vllm.v1.core.sched.async_scheduler import AsyncScheduler\n\n\n"
                                  "class Mine(AsyncScheduler):\n    pass\n")
    (tmp_path / "fu_exit_sched.py").write_text("import sys\n\nimport kvsched  # noqa\n\nsys.exit('refused')\n")
    (tmp_path / "fu_kv_pkg").mkdir()
    (tmp_path / "fu_kv_pkg" / "__init__.py").write_text("")
    (tmp_path / "fu_kv_pkg" / "sched.py").write_text(
        "from kvsched.adapters.vllm.scheduler import KVSchedScheduler\n\n\nclass MyKV(KVSchedScheduler):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    stock = serve(vllm_cli, "--scheduler-cls", "fu_userpkg.plain.Mine")
    assert stock.scheduler_cls == "fu_userpkg.plain.Mine" and stock.middleware == []
    assert "fu_userpkg" not in sys.modules and "fu_userpkg.plain" not in sys.modules
    exiting = serve(vllm_cli, "--scheduler-cls", "fu_exit_sched.Sched")  # names kvsched, so imported: SystemExit
    assert exiting.scheduler_cls == "fu_exit_sched.Sched" and exiting.middleware == []
    mine = serve(vllm_cli, "--scheduler-cls", "fu_kv_pkg.sched.MyKV")
    assert mine.middleware == [compat.MIDDLEWARE_PATH] and "fu_kv_pkg.sched" in sys.modules


@pytest.mark.parametrize("value, message", BAD_TIER_SIZES)
def test_a_bad_tier_size_is_refused_at_parse_naming_the_flag(vllm_cli, capsys, value, message):
    """Every bad `--kvsched-fp8-tier-gb` stops `vllm serve` in this parse, before any engine: one of them runs as the
    real command in tests/integration/test_fp8_tier.py (a `vllm serve` process each is ~10 CPU-seconds of imports)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        serve(vllm_cli, "--scheduler", "kvsched", "--kvsched-fp8-tier-gb", value)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "argument --kvsched-fp8-tier-gb" in err and message in err, err
    assert serve(vllm_cli, "--scheduler", "kvsched", "--kvsched-fp8-tier-gb", "0.05").scheduler_cls is not None


def test_a_tier_size_of_0_sets_no_tier(vllm_cli):
    """`--kvsched-fp8-tier-gb 0`: kvsched with no KV connector at all (tests/integration/test_fp8_tier.py's reference
    for a restored turn's decoding is stock vLLM, not a kvsched server of its own with its tier off)."""
    assert serve(vllm_cli, "--scheduler", "kvsched", "--kvsched-fp8-tier-gb", "0").kv_transfer_config is None
    assert serve(vllm_cli, "--scheduler", "kvsched", "--kvsched-fp8-tier-gb", "0.05").kv_transfer_config is not None
