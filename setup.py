"""Builds the optional C++ extension `kvsched._C` from csrc/ (pybind11) and the mypyc build of kvsched/compiled.py's
MODULES (the per-turn bookkeeping), both in `build_ext`.

Metadata lives in pyproject.toml. Both are optional: when the C++ extension cannot be built the package still imports
and falls back to the torch reference ops; when mypyc fails (or KVSCHED_MYPYC=0) every module runs as pure Python. Set
KVSCHED_REQUIRE_EXT=1 (as `make test` does) to turn a failed build into an error instead. After a complete mypyc build
kvsched/_compiled_manifest.json records the digest of each compiled source: kvsched/compiled.py's guard runs none of
the compiled modules once any of those sources changes.
"""

import importlib.util
import json
import os
import sys
from glob import glob
from typing import Any

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

REQUIRE = os.environ.get("KVSCHED_REQUIRE_EXT") == "1"


def _compiled_spec() -> Any:
    """kvsched/compiled.py loaded by path (importing the package would run its guard)."""
    spec = importlib.util.spec_from_file_location("_kvsched_compiled_spec", os.path.join("kvsched", "compiled.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# One mypyc translation per setup.py process, whichever build_ext instance asks first (setuptools may make several):
# its extensions, their names and the digests of the sources it read (None: not built).
_MYPYC: dict[str, Any] = {}


def _mypyc_extensions() -> list[Any]:
    if "exts" in _MYPYC:
        return list(_MYPYC["exts"])
    _MYPYC.update(exts=[], names=set(), manifest=None)
    if os.environ.get("KVSCHED_MYPYC", "1") == "0":
        return []
    compiled = _compiled_spec()
    try:
        from mypyc.build import mypycify

        # The digests are taken before mypyc reads the sources: an edit during the build reads as stale.
        manifest = compiled.manifest(os.path.abspath("kvsched"))
        # A mypy cache of its own: `make test` runs this build beside `make lint`'s mypy (make -j2), and two mypy
        # processes on one .mypy_cache/cache.db fail with "database is locked" (a fresh clone's `make test` did).
        saved = os.environ.get("MYPY_CACHE_DIR")
        os.environ["MYPY_CACHE_DIR"] = os.path.join("build", "mypyc_cache")
        try:
            exts = mypycify([compiled.source_path(m, "kvsched") for m in compiled.MODULES], group_name=compiled.GROUP)
        finally:
            if saved is None:
                os.environ.pop("MYPY_CACHE_DIR", None)
            else:
                os.environ["MYPY_CACHE_DIR"] = saved
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - mypy missing, or mypyc's type errors (it exits)
        if REQUIRE:
            raise
        print(f"WARNING: mypyc build skipped ({exc!r}); kvsched runs as pure Python", file=sys.stderr)
        return []
    _MYPYC.update(exts=exts, names={ext.name for ext in exts}, manifest=manifest)
    return list(exts)


class OptionalBuildExt(build_ext):
    mypyc_failed = False

    def finalize_options(self) -> None:
        if self.distribution.ext_modules == ext_modules:
            self.distribution.ext_modules = ext_modules + _mypyc_extensions()
        super().finalize_options()

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            if REQUIRE:
                raise
            print(f"WARNING: kvsched._C not built ({exc}); using the torch reference ops", file=sys.stderr)
        if _MYPYC.get("manifest") is not None:
            self._finish_mypyc()

    def _finish_mypyc(self) -> None:
        """The manifest after a complete mypyc build; after a partial one, no compiled module is left to be imported."""
        compiled = _compiled_spec()
        package = os.path.dirname(self.get_ext_fullpath("kvsched._C"))
        target = os.path.join(package, compiled.MANIFEST_NAME)
        if self.mypyc_failed:
            for name in _MYPYC["names"]:
                path = self.get_ext_fullpath(name)
                if os.path.exists(path):
                    os.remove(path)
            if os.path.exists(target):
                os.remove(target)
            return
        for stale in compiled.leftover_builds(package):  # a module taken out of MODULES: its old build goes
            os.remove(stale)
        with open(target, "w") as f:
            json.dump(_MYPYC["manifest"], f, indent=1, sort_keys=True)
            f.write("\n")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if REQUIRE:
                raise
            self.mypyc_failed |= ext.name in _MYPYC.get("names", ())
            print(f"WARNING: {ext.name} not built ({exc})", file=sys.stderr)

    def get_outputs(self) -> list[str]:
        """The manifest goes into a wheel beside the compiled modules."""
        outputs: list[str] = super().get_outputs()
        if _MYPYC.get("manifest") is not None:
            package = os.path.dirname(self.get_ext_fullpath("kvsched._C"))
            outputs.append(os.path.join(package, _compiled_spec().MANIFEST_NAME))
        return outputs


# -ffp-contract=off: no fused multiply-adds, so the kernels round exactly like their torch references. The module is
# built for baseline x86-64; the AVX2 and AVX-512 paths are compiled per function (target attributes) and chosen at
# run time, so one build loads and runs on any x86-64 CPU.
COMPILE_ARGS = ["-O3", "-fopenmp", "-ffp-contract=off"]

ext_modules = [
    Pybind11Extension(
        "kvsched._C",
        sorted(glob("csrc/*.cpp")),
        include_dirs=["csrc/include"],
        cxx_std=17,
        extra_compile_args=COMPILE_ARGS,
        extra_link_args=["-fopenmp"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
